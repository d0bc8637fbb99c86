"""Where should a request's images be decoded: in the ingress, or in the backbone replica?

Both sites run the same decode + preprocess; what differs is what crosses the Ray call from the
ingress to the backbone replica: the encoded images (PNG/JPEG bytes) or the preprocessed float
tensors. This bench measures, in one run on one Ray instance:

- ``decode_ms``: decode + preprocess of one request's images (PIL + the task's timm transform);
- ``call_bytes_ms`` / ``call_tensor_ms``: one Ray actor call carrying the request's encoded bytes /
  its preprocessed tensor (median of ``--calls``), and the payload sizes.

Decoding in the replica costs ``decode_ms`` on the replica (in a thread pool beside the running
forward); decoding in the ingress costs the same ``decode_ms`` in the ONE ingress process that every
backbone's traffic goes through, plus the difference between the two call times::

    python -m bench.decode_site                  # 16 Fashion-MNIST-sized images at 64 px and 224 px
"""
import argparse
import io
import json
import statistics
import time

import numpy as np
import torch

__all__ = ["main"]


def _pngs(n: int, size: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _transform(px: int):
    import timm.data

    return timm.data.create_transform(input_size=(3, px, px), crop_pct=1.0, interpolation="bilinear",
                                      is_training=False)


def _decode(pngs: list[bytes], tf) -> torch.Tensor:
    from PIL import Image

    return torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs])


def _median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images per request")
    p.add_argument("--source-px", type=int, default=28, help="side of the encoded images")
    p.add_argument("--px", default="64,224", help="comma list of model input sizes")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    import ray

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote(num_cpus=0)
    class Sink:
        def take(self, payload) -> int:
            return len(payload) if isinstance(payload, list) else int(payload.numel())

    sink = Sink.remote()
    pngs = _pngs(args.images, args.source_px)
    rows = []
    try:
        for px in [int(x) for x in args.px.split(",")]:
            tf = _transform(px)
            tensor = _decode(pngs, tf)
            rows.append({
                "images": args.images, "source_px": args.source_px, "model_px": px,
                "decode_ms": _median_ms(lambda tf=tf: _decode(pngs, tf), 30),
                "bytes_payload": sum(map(len, pngs)), "tensor_payload": tensor.numel() * tensor.element_size(),
                "call_bytes_ms": _median_ms(lambda: ray.get(sink.take.remote(pngs)), args.calls),
                "call_tensor_ms": _median_ms(lambda tensor=tensor: ray.get(sink.take.remote(tensor)), args.calls),
            })
    finally:
        ray.shutdown()
    for r in rows:
        print(json.dumps(r))
    print(f"{'model px':>8} {'decode ms':>10} {'bytes KB':>9} {'tensor KB':>10} "
          f"{'call(bytes) ms':>15} {'call(tensor) ms':>16}")
    for r in rows:
        print(f"{r['model_px']:>8} {r['decode_ms']:>10.2f} {r['bytes_payload'] / 1024:>9.1f} "
              f"{r['tensor_payload'] / 1024:>10.1f} {r['call_bytes_ms']:>15.2f} {r['call_tensor_ms']:>16.2f}")
    return rows


if __name__ == "__main__":
    main()
