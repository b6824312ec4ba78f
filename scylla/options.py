"""The choices a user picks from, defined once and free of heavy imports (the CLI's parser
and the app's widgets read them before torch loads)."""

QUANTS = ("q4", "none", "int8", "nf4")   # q4: the GGUF's own blocks; none: the fp32 reference
DEFAULT_QUANT = "q4"
BACKENDS = ("lean", "hf")                # lean: the engine's own forward; hf: transformers'
AXES = ("tokens", "layers", "batch")     # the paper's three axes (draft tokens, draft depth, batch size)
SPLITS = ("tune", "report")               # the broad prompt set: choose settings on one half, report on the other
