"""`kvserve serve --replicas N`: the engine replicas as a Ray Serve deployment, routed by one of
router.py's request routers, behind one ingress deployment that serves server/'s own FastAPI
app over a RemoteEngine. A local Ray instance by default; an existing cluster with
--ray-address (KubeRay: the head service's address).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import signal
import sys
import threading

from ray import serve
from ray.serve.config import RequestRouterConfig

from kvserve.cluster.metrics import ClusterCollector
from kvserve.cluster.remote import RemoteEngine
from kvserve.cluster.replica import EngineReplica
from kvserve.cluster.routers import ROUTER_CLASSES
from kvserve.cluster.routing import ROUTING
from kvserve.config import ClusterConfig, EngineConfig, ServerConfig
from kvserve.errors import KVServeError

log = logging.getLogger("kvserve.cluster")
APP_NAME = "kvserve"
ENGINE_DEPLOYMENT = "kvserve-engine"
INGRESS_DEPLOYMENT = "kvserve-ingress"


@serve.ingress()
class Ingress:
    """One OpenAI-compatible front for every replica (server/'s app; RemoteEngine inside)."""

    async def __init__(self, engine, config: ServerConfig):
        info = await engine.describe.remote()
        self.remote = RemoteEngine(engine, info, config.max_queue,
                                   config.max_queue_per_tenant if config.api_keys else None)
        self.config = config

    def __serve_build_asgi_app__(self):
        from kvserve.server.app import build_app

        name = self.config.served_model_name or self.remote.model_name
        return build_app(self.remote, self.config, name,
                         [ClusterCollector(ROUTING, self.remote)])


def replica_engine_config(engine: EngineConfig, cluster: ClusterConfig) -> EngineConfig:
    """Each replica's engine: torch threads = its CPUs unless --threads says otherwise."""
    if engine.threads is not None:
        return engine
    return dataclasses.replace(engine, threads=max(1, int(cluster.replica_cpus)))


def build_application(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig):
    router = RequestRouterConfig(
        request_router_class=ROUTER_CLASSES[cluster.router],
        request_router_kwargs={"max_imbalance": cluster.max_imbalance}
        if cluster.router == "cache-aware" else {},
        request_routing_stats_period_s=cluster.stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 10 * cluster.stats_period_s))
    replicas = serve.deployment(
        EngineReplica, name=ENGINE_DEPLOYMENT, num_replicas=cluster.replicas,
        max_ongoing_requests=cluster.max_ongoing_per_replica,
        ray_actor_options={"num_cpus": cluster.replica_cpus,  # Ray gives each its own GPU
                           **({"num_gpus": 1} if engine.device.startswith("cuda") else {})},
        request_router_config=router, health_check_period_s=2.0, health_check_timeout_s=30.0,
        max_constructor_retry_count=3,  # a bad setting fails alike every time: say so soon
        graceful_shutdown_timeout_s=server.shutdown_timeout_s,
        logging_config={"enable_access_log": False})
    ingress = serve.deployment(  # kvserve's own access log, as the single-process server's
        Ingress, name=INGRESS_DEPLOYMENT, num_replicas=1,
        max_ongoing_requests=server.max_queue + 1024, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=server.shutdown_timeout_s,
        logging_config={"enable_access_log": False})
    return ingress.bind(replicas.bind(replica_engine_config(engine, cluster)), server)


def start(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig,
          quiet: bool = False) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy on --host/--port and deploy; returns
    once every replica is up."""
    import ray

    if not ray.is_initialized():
        if cluster.ray_address is None:
            cpus = max(os.cpu_count() or 1, math.ceil(cluster.replicas * cluster.replica_cpus))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=not quiet,
                     configure_logging=not quiet)
        else:
            try:
                ray.init(address=cluster.ray_address, log_to_driver=not quiet)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise KVServeError(f"cannot join the Ray cluster at --ray-address "
                                   f"{cluster.ray_address!r}: {str(err).splitlines()[0]}") from None
    serve.start(http_options={"host": server.host, "port": server.port})
    try:
        serve.run(build_application(engine, server, cluster), name=APP_NAME, route_prefix="/")
    except RuntimeError as err:
        problem = _start_failure() or str(err)
        stop(shared=cluster.ray_address is not None)
        raise KVServeError(f"the replicas failed to start: {problem}") from None


def _start_failure() -> str | None:
    """The last line of the error a replica's constructor raised (a ConfigError, typically),
    from Serve's status of the deployments."""
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:
        return None
    if app is None:
        return None
    for name in (ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT):
        d = app.deployments.get(name)
        lines = [ln.strip() for ln in (d.message if d else "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception): ", ln)]
        if errors:
            return errors[-1].split(": ", 1)[1] if errors[-1].startswith("kvserve.") \
                else errors[-1]
    return None


def stop(shared: bool = False) -> None:
    """Delete the application; on a Ray instance of our own (not `shared`, a cluster joined
    with --ray-address) stop Serve too. Then disconnect."""
    import ray

    try:
        serve.delete(APP_NAME)
    finally:
        if not shared:
            serve.shutdown()
        ray.shutdown()


def serve_cluster(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig) -> int:
    """The CLI's entry: deploy, say where, and run until SIGINT/SIGTERM."""
    start(engine, server, cluster)
    print(f"kvserve: serving {engine.model} on {cluster.replicas} replica(s) "
          f"({cluster.router} router, Ray "
          f"{'at ' + cluster.ray_address if cluster.ray_address else 'local'}) on "
          f"http://{server.host}:{server.port}/v1", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("kvserve: stopping the replicas", file=sys.stderr, flush=True)
    stop(shared=cluster.ray_address is not None)
    return 0
