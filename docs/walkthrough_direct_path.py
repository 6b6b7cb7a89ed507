# %% [markdown]
# # Direct path patching, from first principles to one library call
#
# A walkthrough on the induction model shipped with fastpatch (no download; a 2-layer rotary
# GPT-NeoX trained by `scripts/train_induction_model.py`). It runs as a plain script
# (`python docs/walkthrough_direct_path.py`, about 6 s on 2 CPU cores) and opens as a notebook
# in Jupyter or VS Code (percent-format cells, jupytext). Every number it prints is computed here;
# the `assert`s check the library against the hand-made version.
#
# The question: an induction head continues `... A B ... A` with `B`. It needs to know, at each
# earlier position, which token came *before* it. Which head supplies that, and does the
# induction head read it through its queries, keys or values? Activation patching says which heads
# matter; **direct path patching** says which head feeds which, and through which input.

# %%
import argparse
import time

import torch

from fastpatch import patching as fp
from fastpatch.attribution import get_attr_patch_edges
from fastpatch.metrics import LogitDiff
from fastpatch.models import induction_prompts, load_induction_model

parser = argparse.ArgumentParser(description="direct path patching walkthrough")
parser.add_argument("--prompts", type=int, default=64)
parser.add_argument("--half-len", type=int, default=16)
args, _ = parser.parse_known_args()  # tolerate Jupyter's own arguments
torch.set_grad_enabled(False)

model = load_induction_model()
clean, corrupted, answer, wrong = induction_prompts(args.prompts, args.half_len, seed=7)
n = args.half_len
print("clean prompt 0:    ", clean[0].tolist())
print("corrupted prompt 0:", corrupted[0].tolist())
print("answer (r_1):", answer[0].item(), " wrong (c_1):", wrong[0].item())

# %% [markdown]
# Clean prompts are `BOS, r_1..r_n, r_1..r_n`: at the last position (`r_n`) an induction head
# finds the earlier `r_n`, looks one step ahead and predicts `r_1`. Corrupted prompts replace the
# first repeat with other tokens `c_1..c_n`, so nothing can be copied. The metric is the logit
# difference `r_1 - c_1` at the last position, averaged over prompts.

# %%
metric = LogitDiff(answer, wrong)
_, clean_cache = model.run_with_cache(clean)
_, corrupted_cache = model.run_with_cache(corrupted)
clean_ld, corrupted_ld = metric(clean_cache["ln_final.hook_normalized"] @ model.W_U), metric(model(corrupted))
print(f"logit difference: clean {float(clean_ld):.2f}, corrupted {float(corrupted_ld):.2f}")
assert clean_ld > corrupted_ld + 5

# %% [markdown]
# ## 1. Attention patterns name the candidates
# A *previous-token head* attends from position `i` to `i - 1`. An *induction head* attends from
# the second `r_k` to the first `r_{k+1}` (the token after the earlier copy of the current token).

# %%
p0, p1 = clean_cache["blocks.0.attn.hook_pattern"], clean_cache["blocks.1.attn.hook_pattern"]
q = torch.arange(1, clean.shape[1])
previous_score = p0[:, :, q, q - 1].mean((0, 2))
q2 = torch.arange(n + 1, 2 * n + 1)
induction_score = p1[:, :, q2, q2 - n + 1].mean((0, 2))
print("layer 0 previous-token scores:", [round(float(s), 2) for s in previous_score])
print("layer 1 induction scores:     ", [round(float(s), 2) for s in induction_score])
prev_head = int(previous_score.argmax())
ind_head = int(induction_score.argmax())

# %% [markdown]
# ## 2. Activation patching: which heads matter?
# Patch one head's output from the clean run into the corrupted run, for every head. fastpatch
# runs all of them batched; `transformer_lens.patching` gives the same numbers one forward pass
# per head.

# %%
heads = fp.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric, progress=False)
print("patched logit difference per head:\n", heads)
assert int(heads[0].argmax()) == prev_head and int(heads[1].argmax()) == ind_head

# %% [markdown]
# Both candidates matter a lot, but this does not say that the previous-token head matters
# *because* the induction head reads it, nor through which input.
#
# ## 3. Direct path patching by hand
# The residual stream entering layer 1 is a sum of writes: the embedding, each layer-0 head's
# `z_h @ W_O[h]`, the biases and the layer-0 MLP. The **direct path** from head `S = L0H{prev}`
# to head `D = L1H{ind}`'s keys is that one term reaching that one input. To patch it:
#
# 1. take the source's clean-minus-corrupted write `delta = (z_clean - z_corrupted)[:, :, S] @ W_O[S]`;
# 2. in the corrupted run, recompute only `D`'s keys from `ln1(resid_pre_corrupted + delta)`;
# 3. everything else (the other heads' keys, every query and value, the MLP) still sees the
#    corrupted residual, so no indirect path (e.g. through the layer-0 MLP) carries the change.

# %%
attn0, attn1, ln1 = model.blocks[0].attn, model.blocks[1].attn, model.blocks[1].ln1
dz = clean_cache["blocks.0.attn.hook_z"][:, :, prev_head] - corrupted_cache["blocks.0.attn.hook_z"][:, :, prev_head]
delta = dz @ attn0.W_O[prev_head]  # [batch, pos, d_model]
resid = corrupted_cache["blocks.1.hook_resid_pre"]


def keys_of_head(residual: torch.Tensor, head: int) -> torch.Tensor:
    """Head ``head``'s keys (before rotary) computed from a residual stream: ln1, then W_K, b_K."""
    return ln1(residual) @ attn1.W_K[head] + attn1.b_K[head]


# Sanity check: recomputing from the unpatched residual gives the model's own keys.
own = corrupted_cache["blocks.1.attn.hook_k"][:, :, ind_head]
assert torch.allclose(keys_of_head(resid, ind_head), own, atol=1e-5)


def patch_keys(k: torch.Tensor, hook) -> torch.Tensor:  # k: [batch, pos, head, d_head]
    k = k.clone()
    k[:, :, ind_head] = keys_of_head(resid + delta, ind_head)
    return k


by_hand = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_k", patch_keys)]))
print(f"L0H{prev_head} -> L1H{ind_head} keys, by hand: {float(by_hand):.4f} "
      f"(corrupted {float(corrupted_ld):.4f}, clean {float(clean_ld):.4f})")

# %% [markdown]
# ## 4. The same with one library call, for every destination head at once

# %%
one_source = fp.get_act_patch_direct_path(model, corrupted, clean_cache, corrupted_cache, metric,
                                          src_layer=0, src_head=prev_head, component="k", verbose=False)
print(f"library, L0H{prev_head} -> every head's keys:\n{one_source}")
assert abs(float(one_source[1, ind_head]) - float(by_hand)) <= 1e-5 * abs(float(by_hand)) + 1e-6

# %% [markdown]
# And from every source head into every destination's queries, keys and values. Subtract the
# corrupted baseline to read effects: K-composition is large from the previous-token head into the
# induction heads; its path into their queries is near zero (the last position's previous token
# is the same in both prompts).

# %%
start = time.perf_counter()
effects = {c: fp.get_act_patch_direct_path_all_sources(model, corrupted, clean_cache, corrupted_cache, metric,
                                                        component=c, verbose=False)[0, :, 1, :] - corrupted_ld
           for c in "qkv"}
seconds = time.perf_counter() - start
for c in "qkv":
    print(f"{c.upper()} paths (rows: layer-0 source head, columns: layer-1 destination head):\n{effects[c]}")
print(f"3 x {effects['k'].numel()} layer-0 -> layer-1 direct paths (from all {3 * 8 * 8} source/destination pairs) in {seconds:.2f} s")
assert int(effects["k"].flatten().argmax()) // effects["k"].shape[1] == prev_head
assert effects["q"][prev_head].abs().max() < 0.05 * effects["k"][prev_head].max()

# %% [markdown]
# ## 5. Linearising the norm
# `ln1` divides by the residual's scale, so the path's effect depends on everything else in the
# residual. `method="linear"` freezes that scale at the corrupted run's (TransformerLens issue
# #111): the delta then enters the key linearly, and the projection of every source's delta into
# every destination is one fused kernel on GPU. Here it is close to the exact value.

# %%
linear = fp.get_act_patch_direct_path_all_sources(model, corrupted, clean_cache, corrupted_cache, metric,
                                                  component="k", verbose=False, method="linear")[0, :, 1, :] - corrupted_ld
print("linearised K paths:\n", linear)
print("max |linear - exact|:", float((linear - effects["k"]).abs().max()))

# %% [markdown]
# ## 6. Edge attribution: every path at first order, from one backward pass
# Attribution patching scores every writer -> reader edge at once (embedding, heads and MLPs into
# every Q/K/V, MLP input and the logits). Restricted to head -> head edges, its top edges point at
# the same K-composition. It underestimates them: the induction head's attention softmax is
# saturated, so the first-order estimate misses part of the effect (the AtP* paper's
# motivation for recomputing the softmax exactly, `get_attr_patch_attn_head_k_all_pos_atpstar`).

# %%
with torch.enable_grad():
    edges = get_attr_patch_edges(model, clean, corrupted, metric)
table = edges.to_frame()
head_to_head = table[table.writer.str.startswith("L0H") & table.reader.str.match(r"L1H\d\.[qkv]$")]
head_to_head = head_to_head.reindex(head_to_head.score.abs().sort_values(ascending=False).index).head(6)
exact = {f"L0H{s}->L1H{d}.{c}": float(effects[c][s, d]) for c in "qkv" for s in range(4) for d in range(4)}
head_to_head["exact"] = [exact[f"{w}->{r}"] for w, r in zip(head_to_head.writer, head_to_head.reader)]
print(head_to_head.to_string(index=False))
top = head_to_head.iloc[0]
assert top.writer == f"L0H{prev_head}" and top.reader.endswith(".k")
