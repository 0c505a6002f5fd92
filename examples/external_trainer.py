#!/usr/bin/env python3
"""An external fedstep trainer in plain Python + numpy.

fedstep-client runs it (client.toml: trainer.kind = "external") with:

  FEDSTEP_GLOBAL_MODEL  the round's global model (safetensors) to start from
  FEDSTEP_OUTPUT_MODEL  where to write the trained model (same tensors)
  FEDSTEP_METRICS_OUT   where to write {"num_examples", "llm_type", "metrics"}
  FEDSTEP_ROUND         the round number (1-based)
  FEDSTEP_ROUND_CONFIG  the job's [round_config] as JSON

and, only when round_config.algorithm = "scaffold", with:

  FEDSTEP_SERVER_VARIATE     the server's control variate c (safetensors: one
                             F32 tensor per float tensor of the model, same
                             names and shapes; metadata, if any, is ignored)
  FEDSTEP_CLIENT_VARIATE     this client's own variate c_i, same layout (zeros
                             on the client's first round); only read
  FEDSTEP_VARIATE_DELTA_OUT  where to write Delta c_i = c_i+ - c_i (F32, same
                             names and shapes as c, no metadata)

fedstep-client keeps c_i itself (c_i+ = c_i + Delta c_i); this trainer never
writes it. A scaffold round without all three variables fails.

It trains fedstep-trainer's MLP layout (fc1.weight [hidden, 64], fc1.bias,
fc2.weight [10, hidden], fc2.bias; PyTorch nn.Linear convention) on the UCI
digits CSV shipped in data/digits/ with minibatch SGD: the same model and
loss as the built-in trainer, so Python and Rust clients can join one job.

safetensors is read and written by hand (u64 little-endian header length,
JSON header, raw little-endian data): no torch, no safetensors package.

Options (command-line, all optional):
  --classes 1,2,3     keep samples of these digits (non-IID share) ...
  --sel-prob 1.0      ... with this probability,
  --def-prob 0.05     and others with this one
  --seed 0            seeds the share and the minibatch order
  --epochs 1          local epochs (round_config.local_epochs overrides)
  --lr 0.1            SGD step size (round_config.learning_rate overrides)
  --batch-size 32     (round_config.batch_size overrides)
  --csv PATH          digits CSV (default: data/digits/digits.csv next to
                      this repository's examples/ directory)

Algorithms (round_config.algorithm, default fedavg; anything else than
fedavg, fedprox or scaffold is refused). Each local step is
w <- w - lr * (g + mu * (w - w_global) + (c - c_i)), as in fedstep-trainer:

  fedavg    plain minibatch SGD (g alone).
  fedprox   round_config.mu adds FedProx's mu/2 * ||w - w_global||^2 to the
            local loss, i.e. mu * (w - w_global) to every gradient (mu is
            applied whenever it is set, with any algorithm, like the
            built-in trainer does).
  scaffold  SCAFFOLD (Karimireddy et al. 2020, option II): every gradient
            also gets the drift correction c - c_i (computed in F32 from the
            variate files). After K local steps (minibatches over all
            epochs) from the global model x to the trained model y (as
            written, in its own dtype), the trainer writes, per element in
            float64 and stored as F32,
              Delta c_i = (x - y) / (K * lr) - c
            so that c_i+ = c_i - c + (x - y) / (K * lr).
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

MAX_HEADER_BYTES = 16 * 1024 * 1024
DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
MLP_NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def fail(message):
    print(f"external_trainer: error: {message}", file=sys.stderr)
    sys.exit(1)


def read_safetensors(path):
    """Returns ({name: ndarray}, metadata). Checks every offset."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        fail(f"{path}: {len(data)} bytes is too short for safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        fail(f"{path}: header length {header_len} is implausible")
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    body = memoryview(data)[8 + header_len :]
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            fail(f"{path}: tensor {name} has dtype {entry['dtype']}; this trainer handles F32/F64")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not (0 <= start <= end <= len(body)) or end - start != count * dtype.itemsize:
            fail(f"{path}: tensor {name} has bad data_offsets {start}..{end}")
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
    return tensors, metadata


def write_safetensors(path, tensors, dtypes, metadata=None):
    """Writes tensors in the given order; `dtypes` maps name to 'F32'/'F64'."""
    header = {}
    chunks = []
    offset = 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype=DTYPES[dtypes[name]]).tobytes()
        header[name] = {
            "dtype": dtypes[name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in chunks:
            f.write(raw)
    os.replace(tmp, path)


def load_digits(path):
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if raw.shape[1] != 65:
        fail(f"{path}: expected 65 columns (64 pixels + label), found {raw.shape[1]}")
    x = raw[:, :64].astype(np.float32) / 16.0
    y = raw[:, 64]
    if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() > 9:
        fail(f"{path}: values out of range")
    return x, y


def client_share(y, classes, sel_prob, def_prob, rng):
    if not classes:
        return np.arange(len(y))
    selected = np.isin(y, classes)
    p = np.where(selected, sel_prob, def_prob)
    return np.nonzero(rng.random(len(y)) < p)[0]


def forward(params, x):
    h = np.maximum(x @ params["fc1.weight"].T + params["fc1.bias"], 0.0)
    return h, h @ params["fc2.weight"].T + params["fc2.bias"]


def loss_and_accuracy(params, x, y):
    _, logits = forward(params, x)
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return loss, accuracy


def sgd(params, x, y, epochs, lr, batch_size, rng, mu=0.0, drift=None):
    """Minibatch SGD on mean cross-entropy; gradients written out by hand.
    mu > 0: FedProx's proximal pull toward the weights training started from.
    drift: SCAFFOLD's c - c_i per tensor, added to every gradient.
    Returns the number of steps taken (SCAFFOLD's K)."""
    anchor = {name: params[name].copy() for name in MLP_NAMES} if mu else None
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            h, logits = forward(params, xb)
            logits = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            d_logits = probs
            d_logits[np.arange(len(yb)), yb] -= 1.0
            d_logits /= len(yb)
            d_h = (d_logits @ params["fc2.weight"]) * (h > 0)
            grads = {
                "fc2.weight": d_logits.T @ h,
                "fc2.bias": d_logits.sum(axis=0),
                "fc1.weight": d_h.T @ xb,
                "fc1.bias": d_h.sum(axis=0),
            }
            for name in MLP_NAMES:
                if anchor is not None:
                    grads[name] = grads[name] + mu * (params[name] - anchor[name])
                if drift is not None:
                    grads[name] = grads[name] + drift[name]
                params[name] -= lr * grads[name]
            steps += 1
    return steps


def read_variate(path, what, model):
    """A SCAFFOLD control variate: the model's tensor names and shapes, F32."""
    tensors, _ = read_safetensors(path)  # metadata is ignored
    if sorted(tensors) != sorted(model):
        fail(f"{what} {path}: expected the model's tensors {sorted(model)}, found {sorted(tensors)}")
    for name, t in tensors.items():
        if t.dtype != DTYPES["F32"]:
            fail(f"{what} {path}: tensor {name} is {t.dtype}, expected F32")
        if t.shape != model[name].shape:
            fail(f"{what} {path}: tensor {name} has shape {list(t.shape)}, "
                 f"the model's has {list(model[name].shape)}")
        if not np.isfinite(t).all():
            fail(f"{what} {path}: tensor {name} has non-finite values")
    return tensors


def env(name):
    value = os.environ.get(name)
    if not value:
        fail(f"{name} is not set (run me from fedstep-client)")
    return value


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="")
    parser.add_argument("--sel-prob", type=float, default=1.0)
    parser.add_argument("--def-prob", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--csv", default=os.path.join(here, "..", "data", "digits", "digits.csv"))
    args = parser.parse_args()

    global_path = env("FEDSTEP_GLOBAL_MODEL")
    output_path = env("FEDSTEP_OUTPUT_MODEL")
    metrics_path = env("FEDSTEP_METRICS_OUT")
    round_number = int(env("FEDSTEP_ROUND"))
    round_config = json.loads(os.environ.get("FEDSTEP_ROUND_CONFIG") or "{}")

    epochs = int(round_config.get("local_epochs", args.epochs))
    lr = float(round_config.get("learning_rate", args.lr))
    batch_size = int(round_config.get("batch_size", args.batch_size))
    if epochs < 1 or batch_size < 1 or not lr > 0:
        fail("local_epochs and batch_size must be >= 1 and learning_rate > 0")
    algorithm = round_config.get("algorithm", "fedavg")
    if algorithm not in ("fedavg", "fedprox", "scaffold"):
        fail(f"round_config.algorithm = {algorithm!r}: this trainer runs fedavg, fedprox or scaffold")
    mu = float(round_config.get("mu", 0.0))
    if not mu >= 0:
        fail("round_config.mu must be >= 0")
    variate_paths = None
    if algorithm == "scaffold":
        names = ["FEDSTEP_SERVER_VARIATE", "FEDSTEP_CLIENT_VARIATE", "FEDSTEP_VARIATE_DELTA_OUT"]
        missing = [name for name in names if not os.environ.get(name)]
        if missing:
            fail(f"round_config.algorithm = 'scaffold' but {', '.join(missing)} "
                 f"{'is' if len(missing) == 1 else 'are'} not set (fedstep-client sets "
                 f"{', '.join(names)} for scaffold rounds)")
        variate_paths = [os.environ[name] for name in names]

    tensors, metadata = read_safetensors(global_path)
    if sorted(tensors) != sorted(MLP_NAMES):
        fail(f"{global_path}: expected tensors {MLP_NAMES}, found {sorted(tensors)}")
    dtypes = {name: next(k for k, v in DTYPES.items() if v == t.dtype) for name, t in tensors.items()}
    # Train in float64 for a stable hand-written backward pass; written back
    # in each tensor's own dtype.
    params = {name: t.astype(np.float64) for name, t in tensors.items()}
    hidden, inputs = params["fc1.weight"].shape
    if inputs != 64 or params["fc2.weight"].shape != (10, hidden):
        fail(f"{global_path}: not a 64 -> hidden -> 10 MLP")

    x, y = load_digits(args.csv)
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    rng = np.random.default_rng([args.seed, 0])
    share = client_share(y, classes, args.sel_prob, args.def_prob, rng)
    if len(share) == 0:
        fail("the class share is empty")
    x, y = x[share].astype(np.float64), y[share]

    drift = None
    if variate_paths is not None:
        server_path, client_path, delta_path = variate_paths
        c = read_variate(server_path, "FEDSTEP_SERVER_VARIATE", tensors)
        c_i = read_variate(client_path, "FEDSTEP_CLIENT_VARIATE", tensors)
        # c - c_i in F32, as the built-in trainer forms it.
        drift = {name: (c[name] - c_i[name]).astype(np.float64) for name in MLP_NAMES}

    steps = sgd(params, x, y, epochs, lr, batch_size,
                np.random.default_rng([args.seed, round_number]), mu, drift)
    loss, accuracy = loss_and_accuracy(params, x, y)
    if not all(np.isfinite(p).all() for p in params.values()):
        fail("training diverged (non-finite weights); lower the learning rate")

    ordered = {name: params[name] for name in tensors}  # keep the global order
    if drift is not None:
        # Option II: Delta c_i = (x - y)/(K*lr) - c per element in float64,
        # x the global model as read, y the trained model as written (in its
        # own dtype); sent as F32.
        if steps == 0:
            fail("SCAFFOLD needs at least one local step")
        scale = 1.0 / (steps * lr)
        delta = {}
        for name in tensors:
            start = tensors[name].astype(np.float64)
            trained = ordered[name].astype(DTYPES[dtypes[name]]).astype(np.float64)
            delta[name] = ((start - trained) * scale - c[name].astype(np.float64)).astype(np.float32)
            if not np.isfinite(delta[name]).all():
                fail(f"SCAFFOLD variate update for {name} is not finite; lower the learning rate")
        write_safetensors(delta_path, delta, {name: "F32" for name in delta})
    write_safetensors(output_path, ordered, dtypes, metadata)
    with open(metrics_path, "w") as f:
        json.dump(
            {"num_examples": int(len(y)), "llm_type": None,
             "metrics": {"loss": loss, "accuracy": accuracy}},
            f,
        )
    print(f"external_trainer: round {round_number}: {len(y)} examples, "
          f"loss {loss:.4f}, accuracy {accuracy:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
