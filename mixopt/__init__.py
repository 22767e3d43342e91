"""mixopt: forecast what a fine-tune will move, and build the data mixture that protects it.

Pipeline (one module per stage): recipe -> sources -> model/sae -> features -> sts -> solver -> mixture -> manifest.
"""

__version__ = "0.1.0"
