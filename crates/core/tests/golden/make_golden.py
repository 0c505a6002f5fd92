#!/usr/bin/env python3
"""Independent reference values for fedstep-core's aggregation.

Writes small F64 models (a hand-written safetensors writer: u64 LE header
length, JSON header, raw little-endian data) and `expected.json` with the
outputs of every pipeline case computed here with numpy, directly from the
formulas in docs/design.md §4 and the papers, sharing no code with the Rust.

Regenerate (only when a formula deliberately changes):
    python3 -m venv /tmp/np && /tmp/np/bin/pip install numpy
    /tmp/np/bin/python crates/core/tests/golden/make_golden.py
"""
import json
import math
import os
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261121)
SHAPES = {"a": (3, 4), "b": (5,)}
N = 5


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f8").tobytes()
        header[name] = {"dtype": "F64", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def flat(model):
    return np.concatenate([model[k].ravel() for k in SHAPES])


def unflat(vec):
    out, i = {}, 0
    for k, s in SHAPES.items():
        n = int(np.prod(s))
        out[k] = vec[i:i + n].reshape(s)
        i += n
    return out


glob = {k: rng.normal(0, 1, s) for k, s in SHAPES.items()}
clients = []
for i in range(N):
    scale = 25.0 if i == 4 else 0.5  # client 4 is an outlier
    clients.append({k: glob[k] + rng.normal(0.2 * i, scale, s) for k, s in SHAPES.items()})
examples = [120, 80, 200, 50, 90]
metrics = [
    {"perplexity": 12.0, "loss": 2.1},
    {"perplexity": 3.5, "loss": 0.9},
    {"perplexity": 40.0, "loss": 3.3},
    {"perplexity": 1.0, "loss": 0.0},
    {"perplexity": 7.25, "loss": 1.5},
]

G = flat(glob)
X = np.stack([flat(c) for c in clients])
D = X - G
ex = np.array(examples, dtype=float)


def wmean(rows, w):
    w = np.asarray(w, dtype=float)
    return (w[:, None] * rows).sum(0) / w.sum()


cases = {}


def case(name, config, vec, use_global):
    cases[name] = {"config": config, "global": use_global, "expected": {k: v.ravel().tolist() for k, v in unflat(vec).items()}}


case("fedavg_examples", "", wmean(X, ex), False)
case("uniform", 'weighting = "uniform"', X.mean(0), False)

q = np.array([((1 / (1 + math.log(m["perplexity"]))) + 1 / (1 + m["loss"])) / 2 for m in metrics])
case("quality_text", 'weighting = "quality"\nllm_type = "SpikingEvoTextLM"', wmean(X, ex * q), False)

norms = np.linalg.norm(D, axis=1)
C = float(np.median(norms))
s = np.minimum(1.0, C / norms)
case("clip_mean", f'[[stages]]\nkind = "clip"\nmax_norm = {C!r}', G + wmean(D * s[:, None], ex), True)

Z = float(np.sort(norms)[-2] * 1.01)  # drops only the largest update
keep = norms <= Z
case("zeroing_mean", f'[[stages]]\nkind = "zeroing"\nmax_norm = {Z!r}', G + wmean(D[keep], ex[keep]), True)

case("median", '[[stages]]\nkind = "median"', np.median(X, axis=0), False)

srt = np.sort(X, axis=0)
case("trimmed_mean", '[[stages]]\nkind = "trimmed_mean"\nbeta = 0.2', srt[1:-1].mean(0), False)

f, m_sel = 1, 2
dist = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
scores = np.array([np.sort(np.delete(dist[i], i))[: N - f - 2].sum() for i in range(N)])
chosen = sorted(np.argsort(scores, kind="stable")[:m_sel].tolist())
case("multi_krum", f'[[stages]]\nkind = "krum"\nbyzantine = {f}\nselect = {m_sel}', wmean(X[chosen], ex[chosen]), False)

delta = wmean(X, ex) - G
lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
mm = (1 - b1) * delta
v_adam = (1 - b2) * delta**2
case("fedadam", '[[stages]]\nkind = "fedadam"\nlearning_rate = 0.1', G + lr * mm / (np.sqrt(v_adam) + tau), True)
v_yogi = 0 - (1 - b2) * delta**2 * np.sign(0 - delta**2)
case("fedyogi", '[[stages]]\nkind = "fedyogi"\nlearning_rate = 0.1', G + lr * mm / (np.sqrt(v_yogi) + tau), True)
v_ada = delta**2
case("fedadagrad", '[[stages]]\nkind = "fedadagrad"\nlearning_rate = 0.1', G + lr * delta / (np.sqrt(v_ada) + tau), True)
case("fedavgm", '[[stages]]\nkind = "fedavgm"\nlearning_rate = 0.7\nmomentum = 0.9', G + 0.7 * delta, True)

write_safetensors(os.path.join(HERE, "global.safetensors"), glob)
for i, c in enumerate(clients):
    write_safetensors(os.path.join(HERE, f"client{i}.safetensors"), c)
meta = [{"client_id": f"client{i}", "num_examples": examples[i], "llm_type": "SpikingEvoTextLM", "metrics": metrics[i]} for i in range(N)]
with open(os.path.join(HERE, "expected.json"), "w") as fh:
    json.dump({"clients": meta, "krum_chosen": chosen, "cases": cases}, fh, indent=1)
print(f"wrote {len(cases)} cases; krum chose {chosen}; clip norm {C:.4f}")
