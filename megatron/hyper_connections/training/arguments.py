"""The names ``monitoring`` and ``tools/demo.py`` still import from here, before the trainer's
flags were split by job into ``parser``, ``checks``, ``factories`` and ``checkpoints``.

Import from those modules; this one goes once ``monitoring`` and ``tools/demo.py`` do.
"""

from .checks import parse_args
from .factories import transformer_config
from .parser import args_as_dict

__all__ = ["args_as_dict", "parse_args", "transformer_config"]
