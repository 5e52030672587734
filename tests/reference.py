"""An independent dense reference for the adapter layer, written from the formulas of
docs/ARCHITECTURE.md §1 (math).

It computes every expert for every token (einsum) and masks with the top-k gates, so it shares no
code with the sparse, sorted, exchanged implementation under test.
"""

import torch


def dense_adapter_output(x, base_weight, params, method, top_k, normalize, scaling, dropped=None):
    """``dropped``: the adapter's input after dropout (default x); the base and the router see x."""
    y = x @ base_weight.t()
    a = x if dropped is None else dropped
    if method == "lora":
        return y + scaling * (a @ params["expert_down"][0].t()) @ params["expert_up"][0].t()
    probs = torch.softmax(x @ params["router.weight"].t(), dim=-1)
    top_values, top_index = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top_values = top_values / top_values.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, top_index, top_values)
    if method == "hydralora":  # one shared A, no per-expert down-projection: B_t (A x)
        h = (a @ params["shared_A"].t()).unsqueeze(1).expand(-1, params["expert_up"].shape[0], -1)
    elif "shared_B" in params:  # MALoRA mirrored: Ā_t x, the experts' own down-projection
        h = torch.einsum("tn,ern->ter", a, params["expert_down"])
    elif "expert_subspace" in params:  # MALoRA with per-expert subspaces S_t
        z = torch.einsum("tn,edn->ted", a, params["expert_subspace"])
        h = torch.einsum("ted,erd->ter", z, params["expert_down"])
    elif method == "malora":
        h = torch.einsum("td,erd->ter", a @ params["shared_A"].t(), params["expert_down"])
    else:
        h = torch.einsum("tn,ern->ter", a, params["expert_down"])
    if "shared_B" in params:  # MALoRA mirrored: expert t's update is S_B P_t Ā_t
        per_expert = torch.einsum("ter,edr,md->tem", h, params["expert_up"], params["shared_B"])
    else:
        per_expert = torch.einsum("ter,emr->tem", h, params["expert_up"])
    return y + scaling * torch.einsum("te,tem->tm", gates, per_expert)


def randomize_adapter_(layer, generator):
    """Give every trainable adapter parameter random values (B̄ = 0 at init would hide most
    gradients); frozen parts keep their initial values (HydraLoRA's identity P_t must stay one), and
    DoRA's magnitude stays near ‖W0‖ so that the rescaling stays moderate."""
    with torch.no_grad():
        for name, param in layer.adapter_tensors():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator).to(param.dtype)
            param.copy_(param * (1 + 0.1 * noise) if name == "magnitude" else 0.5 * noise)


def adapter_params(layer):
    """The layer's parameters by their layout-free names (shared_A, shared_B, expert_down, expert_up,
    router.weight)."""
    return dict(layer.adapter_tensors())


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
