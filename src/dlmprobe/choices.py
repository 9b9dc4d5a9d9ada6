"""The fixed choices of each stage, in a module that imports nothing.

The command line offers them as argparse choices before it imports torch, so that ``dlmprobe
--help`` and every argument error answer at once; the stages that check them import them from here.
"""

TASK_NAMES: tuple[str, ...] = ("arith", "pathstar", "sudoku", "sudoku_choice")  # the classes: dlmprobe.tasks.TASKS
SPLITS: tuple[str, ...] = ("train", "eval")
KINDS: tuple[str, ...] = ("diffusion", "autoregressive")
POSITIONS: tuple[str, ...] = ("learned", "rotary")  # a model's position encoding
ORDERS: tuple[str, ...] = ("confidence", "margin", "entropy", "random")  # which masked token commits first
POSITION_RULES: tuple[str, ...] = ("all", "target", "masked", "answer", "last_prompt", "sep+target")
ACTIVATION_DTYPES: tuple[str, ...] = ("float16", "float32")
PROBE_TARGETS: tuple[str, ...] = ("output", "truth")  # the committed token or the correct one
PROBE_PHASES: tuple[str, ...] = ("before_commit", "after_commit")
READ_RULES: tuple[str, ...] = ("own", "pooled", "frontier")  # or a canvas position
