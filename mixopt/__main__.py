from mixopt.cli import main

main()
