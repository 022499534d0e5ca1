"""Evaluation of MegaContext, apart from the core: context builders for every method at one budget, the
example harness scripts/mc_eval.py runs, the training-proof metrics, the report and its plots."""
