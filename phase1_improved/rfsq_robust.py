"""The seed's import path: ``from phase1_improved.rfsq_robust import ActionRFSQAE``.

The implementation lives in ``common/`` (quantizers in ``common/fsq.py`` and
``common/residual_fsq.py``, the autoencoder in ``common/action_tokenizer.py``).
"""

from common.action_tokenizer import ActionRFSQAE, LoadedTokenizer, load_tokenizer, save_tokenizer
from common.fsq import FSQ
from common.residual_fsq import CONDITIONINGS, ResidualFSQ

__all__ = ["ActionRFSQAE", "FSQ", "ResidualFSQ", "CONDITIONINGS", "LoadedTokenizer", "load_tokenizer", "save_tokenizer"]
