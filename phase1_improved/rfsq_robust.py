"""The seed's import path: ``from phase1_improved.rfsq_robust import ActionRFSQAE``.

The implementation lives in ``common/`` (quantizers in ``common/tokenizer/fsq.py`` and
``common/tokenizer/residual_fsq.py``, the autoencoder in ``common/tokenizer/model.py``).
"""

from common.tokenizer.model import ActionRFSQAE, LoadedTokenizer, load_tokenizer, save_tokenizer
from common.tokenizer.fsq import FSQ
from common.tokenizer.residual_fsq import CONDITIONINGS, ResidualFSQ

__all__ = ["ActionRFSQAE", "FSQ", "ResidualFSQ", "CONDITIONINGS", "LoadedTokenizer", "load_tokenizer", "save_tokenizer"]
