"""The cross-rank weight transport over NCCL: a training rank on GPU 0 broadcasts to a rollout
rank with its own vLLM engine on GPU 1 (`rollout.placement=separate`); the same checks as the
gloo test (tests/distributed/test_cross_rank_transport.py). Needs 2 GPUs (NCCL refuses two
ranks on one device). NEVER RUN: written without a GPU."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA devices")]


def test_nccl_broadcast_gives_the_separate_engine_the_sent_weights(tmp_path):
    from distributed.test_cross_rank_transport import check_transfer

    check_transfer(tmp_path, "nccl", (torch.device("cuda", 0), torch.device("cuda", 1)))
