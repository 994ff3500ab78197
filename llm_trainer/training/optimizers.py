"""
The optimizer of a training run: AdamW on every weight (optimizer=adamw), or Muon on the hidden matrices and
AdamW on the rest (optimizer=muon): the embedding, the output head and the norms.

Each parameter group has a name, its own peak learning rate and weight decay (group_lr and group_weight_decay
override them by name); the schedule scales every group's peak alike. The groups:

    adamw   matrices (every 2-D weight, decayed), norms (no decay)
    muon    hidden (the attention and MLP projections: Muon), embed (the embedding, and the head when tied),
            head (an untied head; a reward model's score head), norms (no decay): AdamW
    LoRA    adapters (AdamW whatever optimizer says: Muon would orthogonalise each low-rank factor, A (rank x in)
            and B (out x rank), on its own, not the update B A they make together; their learning rates are
            AdamW's, as in every fine-tuning config)

Muon is torch.optim.Muon's update (momentum, Nesterov, Newton-Schulz with its coefficients, the learning rate
adjusted to the matrix's shape), with three things our model and our machines need:
- Newton-Schulz runs in bfloat16 on CUDA, as torch's, but in float32 elsewhere: a CPU without bfloat16 matrix
  units runs torch's bfloat16 iteration 44x slower than float32 (the tiny preset's matrices: 1,075 against
  24 ms per step, 2 cores; docs/BENCHMARKS.md);
- a fused projection is the matrices it fuses: the q, k and v rows of qkv_proj and the gate and up rows of
  gate_up_proj are each orthogonalised, and their learning rate adjusted, as the separate matrices they are in
  HF's Llama (muon_split=True, the better by 0.06 val bpb at tiny; False takes each fused matrix whole);
- under FSDP2 a parameter is a DTensor whose rows are sharded over the ranks: its update is gathered,
  orthogonalised whole on every rank, and each rank keeps its own rows, so N ranks take one process's step
  (each rank computes every matrix's iteration: simple and exact; handing matrices out to ranks in turn would
  divide that work, at the cost of one more exchange).

Guarantees, each tested (tests/test_muon.py): Muon's update is its definition, computed in the test; only 2-D
hidden matrices reach Muon; 2 ranks (DDP, FSDP2) equal one process; the state is saved and resumed exactly.
"""

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _adjust_lr

from configurator import fail
from model import MLP, Attention

HEAD_MODULES = ("lm_head", "score")  # the output head's module: a language model's, or a reward model's (model.HEADS)

OPTIMIZERS = ("adamw", "muon")
ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose parameters may be fused matrices (blocks: {parameter: the row count of each matrix it
    stacks}) or FSDP2 DTensors (orthogonalised whole)."""

    def __init__(self, params, blocks=None, **kwargs):
        super().__init__(params, **kwargs)
        self.blocks = blocks or {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(self.orthogonalised(p, update, group), alpha=-lr)

    def orthogonalised(self, p, update, group):
        """Newton-Schulz of each matrix the update stacks, times its shape's lr adjustment; a DTensor's is computed
        on the whole matrix (gathered), then sharded back as p is."""
        whole = update.full_tensor() if isinstance(update, DTensor) else update
        dtype = torch.bfloat16 if whole.device.type == "cuda" else torch.float32
        out = torch.cat([newton_schulz(m, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype).float()
                         * _adjust_lr(1.0, group["adjust_lr_fn"], m.shape)
                         for m in whole.split(self.blocks.get(p, whole.shape[0]))])
        if isinstance(update, DTensor):  # replicated to sharded is a local slice: no communication
            out = DTensor.from_local(out, update.device_mesh, [Replicate()] * update.device_mesh.ndim,
                                     run_check=False).redistribute(update.device_mesh, update.placements)
        return out


def newton_schulz(g, coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), steps=5, eps=1e-7, dtype=torch.bfloat16):
    """torch.optim.Muon's orthogonalisation of a matrix (torch.optim._muon._zeropower_via_newtonschulz, the same
    operations in the same order), in dtype: X = G / |G|_F (transposed to be wide), then `steps` times
    X <- a X + (b A + c A^2) X with A = X X^T. Its singular values end near 1, not at 1 (torch.optim.Muon's doc)."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class Optimizers:
    """Several torch optimizers stepped as one, with the named groups' peak learning rates and weight decays:
    what train.py, torch.amp.GradScaler (param_groups, step) and torch.distributed.checkpoint (an iterable of
    optimizers) take for one optimizer."""

    def __init__(self, optimizers, specs):
        self.optimizers = optimizers
        self.specs = specs  # one dict per group, in param_groups order: name, kind, lr, weight_decay

    def __iter__(self):
        return iter(self.optimizers)

    @property
    def param_groups(self):
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def state_dict(self):
        """Every optimizer's state, keyed (optimizer index, parameter index) (checkpoints save
        distributed.full_state_dicts instead: keyed by parameter name)."""
        sds = [o.state_dict() for o in self.optimizers]
        return {"state": {(i, k): v for i, sd in enumerate(sds) for k, v in sd["state"].items()},
                "param_groups": [g for sd in sds for g in sd["param_groups"]]}

    def schedule(self, scale):
        """Every group at its peak learning rate times scale, and its weight decay as the config says (a resumed
        run's too: the checkpoint's groups would bring back the decay they were saved with)."""
        for g, spec in zip(self.param_groups, self.specs):
            g["lr"], g["weight_decay"] = spec["lr"] * scale, spec["weight_decay"]

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def is_hidden(name, p):
    """A weight of two or more dimensions inside a transformer block (the attention and MLP projections): what Muon
    is for. The embedding and the head are not hidden (a row per token, not a map between hidden states), nor are
    1-D weights (norms)."""
    return ".layers." in f".{name}" and p.dim() >= 2


def named_groups(model, cfg):
    """[(group name, "muon" | "adamw", [(parameter name, parameter)])] of the trainable parameters, none empty."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(".lora_" in n for n, _ in params):
        groups = [("adapters", "adamw", params)]
    elif cfg["optimizer"] == "adamw":
        groups = [("matrices", "adamw", [(n, p) for n, p in params if p.dim() >= 2]),
                  ("norms", "adamw", [(n, p) for n, p in params if p.dim() < 2])]
    else:
        hidden = [(n, p) for n, p in params if is_hidden(n, p)]
        for n, p in hidden:
            if p.dim() != 2:
                fail(f"optimizer=muon takes 2-D hidden matrices; {n} has shape {tuple(p.shape)}: use optimizer=adamw")
        # the output head: the LM head (absent when tied: shared, listed once) or a reward model's score head
        head = [(n, p) for n, p in params if n.split(".")[-2] in HEAD_MODULES]
        rest = [(n, p) for n, p in params if not is_hidden(n, p) and n.split(".")[-2] not in HEAD_MODULES]
        groups = [("hidden", "muon", hidden), ("embed", "adamw", [(n, p) for n, p in rest if p.dim() >= 2]),
                  ("head", "adamw", head), ("norms", "adamw", [(n, p) for n, p in rest if p.dim() < 2])]
    return [g for g in groups if g[2]]


def check_group_keys(cfg, names):
    """group_lr and group_weight_decay name groups this run has, with values >= 0 (lr > 0); else one line."""
    for key in ("group_lr", "group_weight_decay"):
        for name, value in cfg[key].items():
            if name not in names:
                fail(f"{key}: no group {name!r} in this run with optimizer={cfg['optimizer']} (its groups: "
                     f"{', '.join(names)})")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (
                    key == "group_lr" and value == 0):
                fail(f"{key}[{name!r}] must be a number {'> 0' if key == 'group_lr' else '>= 0'}, got {value!r}")


def fused_blocks(model):
    """{fused weight: row counts of the matrices it stacks}: q, k, v of qkv_proj and gate, up of gate_up_proj."""
    blocks = {}
    for m in model.modules():
        if isinstance(m, Attention):
            blocks[m.qkv_proj.weight] = [m.q_size, m.kv_size, m.kv_size]
        elif isinstance(m, MLP):
            blocks[m.gate_up_proj.weight] = [m.gate_up_proj.weight.shape[0] // 2] * 2
    return blocks


def build(model, cfg):
    """The run's Optimizers: its named groups at their peak learning rates and weight decays (AdamW fused on CUDA)."""
    groups = named_groups(model, cfg)
    check_group_keys(cfg, [name for name, _, _ in groups])
    specs, muon, adamw = [], [], []
    for name, kind, params in groups:
        spec = {"name": name, "kind": kind, "lr": cfg["muon_lr"] if kind == "muon" else cfg["learning_rate"],
                "weight_decay": cfg["weight_decay"] if name != "norms" else 0.0}
        spec["lr"] = cfg["group_lr"].get(name, spec["lr"])
        spec["weight_decay"] = cfg["group_weight_decay"].get(name, spec["weight_decay"])
        (muon if kind == "muon" else adamw).append(({"params": [p for _, p in params], "lr": spec["lr"],
                                                     "weight_decay": spec["weight_decay"]}, spec))
    device = next(model.parameters()).device
    blocks = fused_blocks(model) if cfg["muon_split"] else {}
    optimizers = [Muon([g for g, _ in muon], blocks=blocks, momentum=cfg["muon_momentum"], nesterov=True,
                       adjust_lr_fn=cfg["muon_adjust_lr"])] if muon else []
    optimizers.append(torch.optim.AdamW([g for g, _ in adamw], betas=(cfg["beta1"], cfg["beta2"]),
                                        fused=device.type == "cuda"))  # never empty: an embedding, or adapters
    return Optimizers(optimizers, [s for _, s in muon] + [s for _, s in adamw])
