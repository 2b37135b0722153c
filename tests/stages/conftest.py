"""The tiny-model training helpers of tests/train, shared with the stage tests."""

from tests.train.conftest import make_cfg, snapshot, train_in_process  # noqa: F401
