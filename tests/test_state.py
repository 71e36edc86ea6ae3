"""Training state saves without pickle, shared tensors included."""

import torch

from qlora_kit.state import load_tree, save_tree


def test_8bit_optimizer_state_with_shared_code_tables_round_trips(tmp_path):
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(8192)) for _ in range(2)]  # above bnb's min_8bit_size
    opt = bnb.optim.PagedAdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    save_tree(state, tmp_path, "optimizer")
    back = load_tree(tmp_path, "optimizer")
    for i in (0, 1):
        for k, v in state["state"][i].items():
            if torch.is_tensor(v):
                assert torch.equal(back["state"][i][k], v.cpu()), k
