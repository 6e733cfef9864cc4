#!/usr/bin/env python3
"""Text ITL under a mixed text + image load: encoding in the worker's process vs on an
encoder worker (issue #16's benchmark). Standard library only, except `make`, which needs
numpy.

    bench-vlm-mixed.py make OUT [--vision siglip-base-224|smolvlm-512] [--text tiny|smollm2-135m]
        Builds a bench checkpoint from tests/fixtures/tiny-idefics3: the fixture's tokenizer,
        chat template and processor layout, a vision tower and text model of real shapes with
        random weights (speed is all that is measured; the answers are noise). One tile per
        image (the processor's longest edge is the tile).

    bench-vlm-mixed.py run --turbine BIN --model DIR [--device cuda:0] [--shapes "inproc encoder"]
                           [--text-streams 8] [--image-clients 2] [--seconds 40] [--runs 3]
        For each shape, starts `turbine up` on a generated cluster file, warms up, then runs
        TEXT streams of text-only chat requests (streamed, max_tokens 64, ignore_eos) beside
        IMAGE clients sending one new image each (a fresh PNG, so no cache hits) for SECONDS,
        and prints one JSON line per run and a table of medians: the text requests' ITL p50 /
        p99 and TTFT p50, and the images served per second.
          inproc:  one aggregated worker; it encodes its requests' images itself.
          encoder: the same worker plus a `role: encoder` group on the same device; the
                   worker only splices embeddings.
"""

import argparse
import base64
import http.client
import json
import shutil
import statistics
import struct
import threading
import time
import zlib
from pathlib import Path

from turbine_server import TurbineServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-idefics3"

VISION_SHAPES = {
    # SigLIP-base/16 at 224 px: the shape of the CPU/CUDA tower benches.
    "siglip-base-224": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, image_size=224, patch_size=16),
    # SmolVLM-256M's tower: SigLIP-base/16 at 512 px.
    "smolvlm-512": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=512, patch_size=16),
}
TEXT_SHAPES = {
    "tiny": None,  # the fixture's own text model
    # SmolLM2-135M's shape (SmolVLM-256M's text model), the fixture's vocabulary.
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64),
}


# ---------------------------------------------------------------- safetensors, by hand


def read_safetensors(path: Path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    return {k: (v["dtype"], v["shape"], body[v["data_offsets"][0] : v["data_offsets"][1]])
            for k, v in header.items()}


def write_safetensors(path: Path, tensors) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, (_, _, raw) in tensors.items():
            f.write(raw)


def make(out: Path, vision: str, text: str) -> None:
    import numpy as np

    rng = np.random.default_rng(7)
    v = VISION_SHAPES[vision]
    t = TEXT_SHAPES[text]
    out.mkdir(parents=True, exist_ok=True)
    for f in FIXTURE.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "reference.safetensors", "reference.json",
                                          "serving.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((FIXTURE / "config.json").read_text())
    config["vision_config"].update(v)
    if t is not None:
        config["text_config"].update(t)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    scale = config["scale_factor"]
    tile = v["image_size"]
    proc = json.loads((FIXTURE / "processor_config.json").read_text())
    proc["image_seq_len"] = (tile // v["patch_size"]) ** 2 // scale**2
    proc["image_processor"]["max_image_size"] = {"longest_edge": tile}
    proc["image_processor"]["size"] = {"longest_edge": tile}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))

    def rand(*shape, std=0.02):
        return ("F32", shape, (rng.standard_normal(shape, dtype=np.float32) * std).tobytes())

    def ones(n):
        return ("F32", (n,), np.ones(n, dtype=np.float32).tobytes())

    def zeros(n):
        return ("F32", (n,), np.zeros(n, dtype=np.float32).tobytes())

    tensors = {}
    fixture = read_safetensors(FIXTURE / "model.safetensors")
    tc = config["text_config"]
    if t is None:
        tensors.update({k: x for k, x in fixture.items() if "vision_model" not in k and "connector" not in k})
    else:
        h, i, kv = tc["hidden_size"], tc["intermediate_size"], tc["num_key_value_heads"] * tc["head_dim"]
        q = tc["num_attention_heads"] * tc["head_dim"]
        vocab = tc["vocab_size"]
        tensors["lm_head.weight"] = rand(vocab, h)
        tensors["model.text_model.embed_tokens.weight"] = rand(vocab, h, std=1.0)
        tensors["model.text_model.norm.weight"] = ones(h)
        for l in range(tc["num_hidden_layers"]):
            p = f"model.text_model.layers.{l}."
            tensors[p + "input_layernorm.weight"] = ones(h)
            tensors[p + "post_attention_layernorm.weight"] = ones(h)
            tensors[p + "mlp.gate_proj.weight"] = rand(i, h)
            tensors[p + "mlp.up_proj.weight"] = rand(i, h)
            tensors[p + "mlp.down_proj.weight"] = rand(h, i)
            tensors[p + "self_attn.q_proj.weight"] = rand(q, h)
            tensors[p + "self_attn.k_proj.weight"] = rand(kv, h)
            tensors[p + "self_attn.v_proj.weight"] = rand(kv, h)
            tensors[p + "self_attn.o_proj.weight"] = rand(h, q)
    vh, vi = v["hidden_size"], v["intermediate_size"]
    patches = (tile // v["patch_size"]) ** 2
    e = "model.vision_model.embeddings."
    tensors[e + "patch_embedding.weight"] = rand(vh, 3, v["patch_size"], v["patch_size"])
    tensors[e + "patch_embedding.bias"] = zeros(vh)
    tensors[e + "position_embedding.weight"] = rand(patches, vh)
    for l in range(v["num_hidden_layers"]):
        p = f"model.vision_model.encoder.layers.{l}."
        for norm in ("layer_norm1", "layer_norm2"):
            tensors[p + norm + ".weight"] = ones(vh)
            tensors[p + norm + ".bias"] = zeros(vh)
        tensors[p + "mlp.fc1.weight"] = rand(vi, vh)
        tensors[p + "mlp.fc1.bias"] = zeros(vi)
        tensors[p + "mlp.fc2.weight"] = rand(vh, vi)
        tensors[p + "mlp.fc2.bias"] = zeros(vh)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[p + f"self_attn.{proj}.weight"] = rand(vh, vh)
            tensors[p + f"self_attn.{proj}.bias"] = zeros(vh)
    tensors["model.vision_model.post_layernorm.weight"] = ones(vh)
    tensors["model.vision_model.post_layernorm.bias"] = zeros(vh)
    tensors["model.connector.modality_projection.proj.weight"] = rand(tc["hidden_size"], vh * scale * scale)
    write_safetensors(out / "model.safetensors", tensors)
    size = (out / "model.safetensors").stat().st_size
    print(f"bench checkpoint: {out} ({size / 1e6:.0f} MB; vision {vision}, text {text}, "
          f"{proc['image_seq_len']} image tokens per tile)")


# ---------------------------------------------------------------- load


def png(seed: int, side: int) -> bytes:
    """A side x side RGB PNG whose pixels depend on `seed` (no imaging library needed)."""
    rows = []
    for y in range(side):
        row = bytearray([0])
        for x in range(side):
            row += bytes(((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y + seed) % 256))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows), 1))
            + chunk(b"IEND", b""))


def stream_chat(port: int, body: dict, timeout: float):
    """POSTs a streamed chat request; returns (status, [arrival time of each content chunk])."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        msg = resp.read()[:300]
        conn.close()
        return resp.status, msg
    times = []
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for c in chunk.get("choices", []):
            if c.get("delta", {}).get("content"):
                times.append(time.perf_counter())
    conn.close()
    return 200, times


def load(port: int, model: str, text_streams: int, image_clients: int, seconds: float, side: int, seed0: int):
    stop = time.perf_counter() + seconds
    itl, ttft, errors = [], [], []
    images = [0]
    lock = threading.Lock()
    seed = [seed0]

    def text_client(k: int):
        n = 0
        while time.perf_counter() < stop:
            n += 1
            body = {"model": model, "stream": True, "max_tokens": 64, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Describe stripes and circles, story {k}-{n}."}]}
            t0 = time.perf_counter()
            status, times = stream_chat(port, body, 120)
            with lock:
                if status != 200 or not times:
                    errors.append(f"text {status}: {times!r}"[:200])
                    continue
                ttft.append(times[0] - t0)
                itl.extend(b - a for a, b in zip(times, times[1:]))

    def image_client():
        while time.perf_counter() < stop:
            with lock:
                seed[0] += 1
                s = seed[0]
            url = "data:image/png;base64," + base64.b64encode(png(s, side)).decode()
            body = {"model": model, "stream": True, "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What is in this picture?"}]}]}
            status, times = stream_chat(port, body, 120)
            with lock:
                if status != 200:
                    errors.append(f"image {status}: {times!r}"[:200])
                elif time.perf_counter() <= stop:
                    images[0] += 1

    threads = [threading.Thread(target=text_client, args=(k,)) for k in range(text_streams)]
    threads += [threading.Thread(target=image_client) for _ in range(image_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return itl, ttft, images[0] / min(elapsed, seconds), errors


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def cluster(model: Path, port: int, device: str, shape: str) -> str:
    encoder = (f"  - {{role: encoder, replicas: 1, device: {device}}}\n"
               if shape == "encoder" else "")
    return (f"model: {{path: \"{model}\", served_name: bench-vlm}}\n"
            f"http: {{host: 127.0.0.1, port: {port}}}\n"
            f"workers:\n{encoder}"
            f"  - {{role: aggregated, replicas: 1, device: {device}, kv_blocks: 4096, block_size: 16,"
            f" max_num_batched_tokens: 4096, max_num_seqs: 64}}\n")


def run(args) -> None:
    model = Path(args.model).resolve()
    proc_cfg = json.loads((model / "processor_config.json").read_text())
    side = proc_cfg["image_processor"]["max_image_size"]["longest_edge"]
    rows = {}
    for shape in args.shapes.split():
        with TurbineServer(args.turbine, lambda port: cluster(model, port, args.device, shape)) as server:
            port = server.port
            load(port, "bench-vlm", 2, 1, 5, side, 10_000_000)  # warm-up (graphs, kernels)
            for r in range(args.runs):
                itl, ttft, ips, errors = load(port, "bench-vlm", args.text_streams, args.image_clients,
                                              args.seconds, side, 1_000_000 * (r + 1))
                row = {"shape": shape, "run": r, "itl_p50_ms": pct(itl, 50) * 1e3,
                       "itl_p99_ms": pct(itl, 99) * 1e3, "itl_max_ms": max(itl, default=float("nan")) * 1e3,
                       "ttft_p50_ms": pct(ttft, 50) * 1e3,
                       "text_tok_per_s": (len(itl) + len(ttft)) / args.seconds,
                       "images_per_s": ips, "text_tokens": len(itl) + len(ttft), "errors": len(errors)}
                print(json.dumps(row), flush=True)
                for e in errors[:3]:
                    print("  error:", e, flush=True)
                rows.setdefault(shape, []).append(row)
    print(f"\nmedians over {args.runs} runs, {args.text_streams} text streams + {args.image_clients} "
          f"image clients, {side}px images, {args.seconds:.0f} s each, device {args.device}:")
    print("| shape | text ITL p50 ms | text ITL p99 ms | text ITL max ms | text TTFT p50 ms | text tok/s | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape, rs in rows.items():
        m = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {shape} | {m('itl_p50_ms'):.2f} | {m('itl_p99_ms'):.2f} | {m('itl_max_ms'):.1f} "
              f"| {m('ttft_p50_ms'):.1f} | {m('text_tok_per_s'):.0f} | {m('images_per_s'):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="build a bench checkpoint (needs numpy)")
    mk.add_argument("out")
    mk.add_argument("--vision", choices=sorted(VISION_SHAPES), default="smolvlm-512")
    mk.add_argument("--text", choices=sorted(TEXT_SHAPES), default="smollm2-135m")
    rn = sub.add_parser("run", help="serve the checkpoint in each shape and measure")
    rn.add_argument("--turbine", default=str(ROOT / "target" / "release" / "turbine"))
    rn.add_argument("--model", required=True)
    rn.add_argument("--device", default="cpu")
    rn.add_argument("--shapes", default="inproc encoder")
    rn.add_argument("--text-streams", type=int, default=8)
    rn.add_argument("--image-clients", type=int, default=2)
    rn.add_argument("--seconds", type=float, default=40)
    rn.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    if a.cmd == "make":
        make(Path(a.out), a.vision, a.text)
    else:
        run(a)


if __name__ == "__main__":
    main()
