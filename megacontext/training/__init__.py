"""Training-only MegaContext code: the end-to-end objective, the retrieval recipe, the trainer and its telemetry.
Inference (megacontext.runtime) never imports this package."""
