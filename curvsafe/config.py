"""Defaults shared by the API, the command line and the benchmarks (kept free of heavy imports, so that
``curvsafe --help`` stays fast)."""

ONE_SIDED = "anchor"  # the restore objective without benign prompts
TWO_SIDED = "anchor+4*benign"  # the default objective when benign prompts are given (README: over-refusal)
BENIGN_BUDGET = 0.05  # nats/token the benign side may rise over max(before, aligned) (README: over-refusal)
