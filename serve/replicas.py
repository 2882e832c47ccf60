"""Replicas on Ray Serve (`serve --ray`, the `ray` extra): the same OpenAI app, one model per replica.

Where one machine is not enough, an existing engine spreads the load: Ray Serve starts N replicas of the app
(each loads the artifact and batches its own requests) behind its HTTP proxy, on a local Ray instance or on a
cluster (`--ray-address`). Every node of a cluster must see the artifact folder at the same path.
"""
from __future__ import annotations

from pathlib import Path

from dovetail_onnx.runtime.errors import DovetailError


def serve_replicas(artifact: Path, name: str, host: str, port: int, replicas: int, address: str | None,
                   max_queue: int, max_batch: int, api_key: str | None, draft_device: str, threads: int | None) -> None:
    """Run until interrupted: `replicas` copies of the app on Ray Serve's proxy at host:port."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise DovetailError("--ray needs Ray Serve: pip install 'dovetail-onnx[ray]'") from None

    def build():
        """Runs on each replica: its own model and app (its own batching worker)."""
        from dovetail_onnx.runtime import Model
        from dovetail_onnx.serve.app import create_app

        return create_app(Model(artifact, draft_device=draft_device, threads=threads), name, max_queue, api_key,
                          max_batch)

    try:
        ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
    except (ConnectionError, ValueError) as exc:
        raise DovetailError(f"cannot reach the Ray cluster at {address}: {exc}; check --ray-address") from exc
    try:
        deployment = serve.deployment(
            serve.ingress(build)(), name="dovetail", num_replicas=replicas,
            # Each replica's ONNX Runtime threads are the CPUs Ray reserves for it.
            ray_actor_options={"num_cpus": threads or 1},
            max_ongoing_requests=max_queue + max_batch)
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment.bind(), name=name, route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()
