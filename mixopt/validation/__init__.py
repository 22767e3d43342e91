"""Validation: does a forecast say what a real fine-tune moves? (`mixopt validate`, DESIGN.md section 7)

A sub-product on top of the core: it imports mixopt's stages, the core never imports it.

1. `data`: split each evaluation domain by content hash into a scoring part (what the scores see) and held-out
   evaluation items (what the metrics measure); hold out some of each source too (its own gain).
2. `measure`: every metric on the evaluation items, base model and each fine-tune (cached by content).
3. `finetune`: fine-tune a fresh copy on each source (the core trainer `mixopt.finetune`), measure again.
4. `scoring`: score every (source, domain) with every scorer of the registry (`pipeline.score_datasets`),
   each source taken as the target and the domains' scoring parts as the domains; model and SAE load once.
5. `analysis`: correlate each score with |change| and signed change over the source x domain cells, for the
   metrics whose change is reliable; partial correlation of each STS variant given similarity.
6. `compare` (`--compare-mixtures`) and `sweep` (`--sweep`) build on these; `run` orchestrates; `report`
   holds every table and plot.
"""
