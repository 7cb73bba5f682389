# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exploring S2AP on digits
#
# This notebook walks through the whole pipeline of `s2ap-lightning` on scikit-learn's bundled 8x8
# digits, on a CPU, in a few minutes: robust pretraining, HYDRA and S2AP mask search, finetuning,
# evaluation, and the paper's analysis (mask stability, score-space sharpness, loss landscapes).
# Every piece of logic lives in the `s2ap_lightning` package; the notebook only calls and plots.
#
# Set `S2AP_NOTEBOOK_FAST=1` for a smoke run with tiny settings (the test suite does).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Image, Markdown, display

from s2ap_lightning.data import RobustDataModule

FAST = os.environ.get("S2AP_NOTEBOOK_FAST") == "1"
OUT = Path(os.environ.get("S2AP_NOTEBOOK_OUT", "runs/notebook"))
torch.set_num_threads(max(1, torch.get_num_threads()))

# %% [markdown]
# ## The data
# 1,797 real handwritten digits, 8x8 pixels scaled to [0, 1]; a fixed seeded split into train,
# validation (for model selection) and test. The threat model is L-inf with eps 0.1.

# %%
dm = RobustDataModule("digits")
dm.setup()
print(f"train {len(dm.train_set)}, val {len(dm.val_set)}, test {len(dm.test_set)}")
fig, axes = plt.subplots(1, 8, figsize=(8, 1.3))
for ax, i in zip(axes, range(8)):
    x, y = dm.train_set[i]
    ax.imshow(x[0], cmap="gray_r")
    ax.set_title(int(y))
    ax.axis("off")
plt.show()

# %% [markdown]
# ## The pipeline: pretrain, search masks with HYDRA and S2AP, finetune, evaluate
# `run_demo` is the Quickstart job: a one-seed `s2ap study` preset, run through the study's cells.
# `sparsity` is the *pruned* fraction: 0.9 keeps 10 % of every layer. S2AP uses `gamma` (the relative
# score-space radius) after `warmup_epochs` of plain HYDRA. It returns one `ResultRow` per model.

# %%
from s2ap_lightning.jobs.demo import format_table, run_demo

if FAST:
    rows = run_demo(
        out=str(OUT),
        sparsities=[0.9],
        pretrain_epochs=2,
        prune_epochs=2,
        warmup_epochs=1,
        finetune_epochs=1,
        aa_images=0,  # AutoAttack skipped in the smoke run (it was half its time); the full run keeps it
        pgd_steps=5,
        progress=False,
    )
else:
    rows = run_demo(out=str(OUT), sparsities=[0.9, 0.99], progress=False)

# %%
display(Markdown("```\n" + format_table(rows) + "\n```"))

# %% [markdown]
# ## The report
# Robust accuracy against sparsity, mask flips per epoch (HYDRA against S2AP), the top Hessian
# eigenvalue of the robust loss with respect to the scores, and per-layer sparsity.

# %%
for name in ("robust_vs_sparsity.png", "hamming_per_epoch.png", "lambda_max.png", "layer_sparsity.png"):
    display(Image(filename=str(OUT / name)))

# %% [markdown]
# ## Looking into one mask search
# Load the HYDRA and S2AP search checkpoints (each row names its search's) and measure their
# score-space sharpness on a fixed validation subset,
# then slice the robust loss along a random score direction (scaled per layer to the score norm).
# The mask flips counted along the path show how flat the loss is where the mask changes.

# %%
from s2ap_lightning.analysis.landscape import landscape_1d
from s2ap_lightning.analysis.sharpness import score_space_sharpness
from s2ap_lightning.stages import ScoreSpaceSAMPruner

x_val = torch.stack([dm.val_set[i][0] for i in range(64)])
y_val = torch.tensor([int(dm.val_set[i][1]) for i in range(64)])
curves = {}
for row in rows:
    if row.sparsity != 0.9:
        continue
    ckpt = row.search_checkpoint
    pruner = ScoreSpaceSAMPruner.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    objective = pruner.objective()  # the function the search minimised, for the analyses
    report = score_space_sharpness(objective, x_val, y_val, rho=0.01, max_iter=10 if FAST else 30)
    print(
        f"{row.method}: lambda_max {report.lambda_max:.4g}, worst-case loss increase {report.sharpness:.4g}"
    )
    curves[row.method] = landscape_1d(
        objective, x_val, y_val, alphas=torch.linspace(-0.5, 0.5, 5 if FAST else 21).tolist()
    )

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
for method, land in curves.items():
    ax1.plot(land.alphas, land.loss, marker=".", label=method)
    ax2.plot(land.alphas, land.flips, marker=".", label=method)
ax1.set(xlabel="step (x ||s_l||)", ylabel="robust loss", title="1-D score-space slice")
ax2.set(xlabel="step (x ||s_l||)", ylabel="mask flips", title="mask flips along the slice")
ax1.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Next steps
# * `s2ap test --ckpt_path ...` runs the full evaluation protocol (PGD-50, AutoAttack, gradient-masking
#   checks) and writes a JSON record beside the checkpoint.
# * `s2ap security CKPT` draws a security curve from FMN minimum-norm perturbations.
# * `configs/` holds the CIFAR-10 / SVHN settings of the paper; see the README.
