"""Adaptation served over HTTP by Ray Serve: each replica loads a learner once and adapts it per request.

    python -m platform.serve --model checkpoints/omniglot-5w1s [--port 8000] [--host 127.0.0.1] [--cache-size N] ...
    serve run platform.serve:app model=models:/omniglot@champion          # the builder, through Serve's CLI
    serveConfigV2: import_path: platform.serve:build_app, args: {model: ..., cache_size: ...}   # KubeRay

POST / {"support_x": [...], "support_y": [...], "query_x": [...], "steps"?: N, "task_id"?: "..."}
  -> {"task_id": "...", "adapted": true, "classes": [...], "labels": [...], "probabilities": [[...]]}
     (regression: "values"). `support_x`/`query_x` are nested lists: images (n, C, S, S) in [0, 1] of
     the run's task.channels and task.image_size ((n, S, S) for one channel, ink high; Omniglot's
     S is 28), or x values (n,) / (n, 1); labels are the user's names.
POST / {"task_id": "...", "query_x": [...]}: predicts with the task adapted before, no adaptation.
  Header `serve_multiplexed_model_id: <task_id>` (instead of, or equal to, the body's task_id): Serve
  routes the request to a replica that holds the task.
GET /  -> the replica's model, limits, cache occupancy, adaptation count and RSS.

Adapt once, predict many: the adapted model (fast weights or prototypes: learner.AdaptedModel) is kept
per replica in a bounded LRU under the request's task_id, else under the SHA-256 of its support set
and steps, so resending a support set is a cache hit too. A task_id sent with a different support
set is adapted again and replaced. The LRU is Serve's model multiplexing (`serve.multiplexed`, a task
is a "model"): each replica reports the tasks it holds, and Serve's router sends a request carrying
the header to a replica that holds its task (one with the fewest tasks when none does). A query-only
request that still reaches a replica without the task (the header left out, the task evicted, its
replica gone, or sent within the moment before the router learns where it was adapted) answers 404
and the client resends the support set.

Bad requests answer 4xx with {"error": "...", "problems": [...]}, each problem naming the field.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import numpy as np
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from ray import serve
from ray.serve.config import AutoscalingConfig
from starlette.requests import Request
from starlette.responses import JSONResponse

from platform.algorithms import BN_STATS
from platform.cli import run
from platform.config import ConfigError
from platform.learner import AdaptedModel, Learner, load_learner

FIELDS = ("support_x", "support_y", "query_x", "steps", "task_id")
MAX_TASK_ID = 200  # characters
ROUTING_HEADER = "serve_multiplexed_model_id"  # Serve's proxy routes on it (model multiplexing)


class ServeArgs(BaseModel):
    """The application's arguments: the model, the request limits, the cache and the replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="checkpoint file, folder or s3:// prefix, or runs:/..., models:/NAME@ALIAS")
    bn_stats: Literal[BN_STATS] = "support"
    cache_size: PositiveInt = 128  # adapted tasks kept per replica (a Conv4-64 MAML task: ~0.5 MB)
    max_support: PositiveInt = 500  # examples
    max_query: PositiveInt = 1000  # examples
    max_ways: PositiveInt = 100  # distinct labels (a MAML-family head also limits them to its outputs)
    max_steps: int = Field(100, ge=0)
    max_request_bytes: PositiveInt = 32 * 1024**2
    num_cpus: float = Field(1.0, gt=0)  # per replica; torch's thread count
    min_replicas: int = Field(1, ge=0)
    max_replicas: PositiveInt = 4
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_ongoing_requests: PositiveInt = 64  # per replica; at 8, 32 concurrent requests ran 7x slower (docs/serving.md)


class BadRequest(Exception):
    """A request we cannot answer: an HTTP status and one line per problem, each naming the field."""

    def __init__(self, problems: list[str], status: int = 400):
        self.problems, self.status = problems, status
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class TaskRequest:
    query_x: np.ndarray
    support_x: np.ndarray | None
    support_y: list | np.ndarray | None
    steps: int | None
    task_id: str | None


def examples(value, field: str, limit: int, limit_name: str, pixels: bool) -> np.ndarray:
    """A field's nested lists as one float32 array (the learner checks the shape); `pixels`: in [0, 1]."""
    if not isinstance(value, list) or not value:
        raise BadRequest([f"{field}: must be a non-empty list of examples"])
    if len(value) > limit:
        raise BadRequest([f"{field}: {len(value)} examples; this server takes at most {limit} ({limit_name})"], 413)
    try:
        array = np.asarray(value)
    except ValueError:
        raise BadRequest([f"{field}: the examples are not all of one shape"]) from None
    if array.dtype.kind not in "fiu":
        raise BadRequest([f"{field}: must hold only numbers (nested lists of numbers)"])
    array = array.astype(np.float32)
    if pixels and not ((array >= 0) & (array <= 1)).all():  # also catches NaN
        raise BadRequest([f"{field}: pixel values must be finite numbers in [0, 1] (not 0-255)"])
    return array


def _steps(value, max_steps: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= max_steps:
        raise BadRequest([f"steps = {value!r}: must be an integer from 0 to {max_steps} (max_steps)"])
    return value


def _task_id(value, routed: str) -> str | None:
    """The body's task_id, else the routing header's (`routed`, "" when absent); given both, they agree."""
    if routed and value is not None and value != routed:
        problem = f"differs from the {ROUTING_HEADER} header ({routed[:40]!r}); send one task id"
        raise BadRequest([f"task_id = {str(value)[:40]!r}: {problem}"])
    field, value = ("task_id", value) if value is not None else (ROUTING_HEADER, routed or None)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TASK_ID:
        raise BadRequest([f"{field} = {str(value)[:40]!r}: must be a string of 1 to {MAX_TASK_ID} characters"])
    return value


def _labels(value, args: ServeArgs, classification: bool):
    if not classification:
        return examples(value, "support_y", args.max_support, "max_support", pixels=False)
    if not isinstance(value, list):
        raise BadRequest(["support_y: must be a list of labels (strings or integers), one per support example"])
    ways = len({v for v in value if isinstance(v, (str, int))})
    if ways > args.max_ways:
        raise BadRequest([f"support_y: {ways} distinct labels; this server takes at most {args.max_ways} (max_ways)"])
    return value


def parse_task(body: bytes, args: ServeArgs, classification: bool, routed: str = "") -> TaskRequest:
    """A request body checked against the limits; the learner checks the rest (shapes, label counts).
    `routed`: the task id of the routing header ("" without one)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest([f"body: not JSON ({e})"]) from None
    if not isinstance(data, dict):
        raise BadRequest([f"body: must be a JSON object with the fields {', '.join(FIELDS)}"])
    if unknown := sorted(set(data) - set(FIELDS)):
        raise BadRequest([f"{name}: unknown field; the fields are {', '.join(FIELDS)}" for name in unknown])
    if "query_x" not in data:
        raise BadRequest(["query_x: missing; give the examples to predict"])
    task_id, steps = _task_id(data.get("task_id"), routed), _steps(data.get("steps"), args.max_steps)
    query_x = examples(data["query_x"], "query_x", args.max_query, "max_query", classification)
    if "support_x" not in data and "support_y" not in data:
        if task_id is None:
            raise BadRequest(["support_x: missing; send support_x and support_y, or the task_id of an adapted task"])
        return TaskRequest(query_x, None, None, steps, task_id)
    if missing := [f for f in ("support_x", "support_y") if f not in data]:
        raise BadRequest([f"{missing[0]}: missing; support_x and support_y come together"])
    support_x = examples(data["support_x"], "support_x", args.max_support, "max_support", classification)
    return TaskRequest(query_x, support_x, _labels(data["support_y"], args, classification), steps, task_id)


def support_digest(task: TaskRequest, steps: int) -> str:
    """The SHA-256 of a support set and the inner steps: the cache key of a task sent without a task_id."""
    h = hashlib.sha256()
    h.update(f"{task.support_x.shape} steps={steps}\n".encode())
    h.update(np.ascontiguousarray(task.support_x).tobytes())
    y = task.support_y
    h.update(np.ascontiguousarray(y).tobytes() if isinstance(y, np.ndarray) else json.dumps(y).encode())
    return h.hexdigest()


class CachedTask:
    """An adapted task in a replica's cache (Serve's multiplexed models), under its key. Serve calls a
    multiplexed model's `__del__` when it evicts it (its unload hook): `on_evict` keeps the replica's
    set of held keys true. Called again by the garbage collector, it does nothing."""

    def __init__(self, key: str, digest: str, model: AdaptedModel, on_evict: Callable[[str], None]):
        self.key, self.digest, self.model = key, digest, model
        self._on_evict: Callable[[str], None] | None = on_evict

    def replace(self, digest: str, model: AdaptedModel) -> None:
        self.digest, self.model = digest, model

    def __del__(self):
        on_evict, self._on_evict = self._on_evict, None
        if on_evict is not None:
            on_evict(self.key)


def predictions_json(adapted: AdaptedModel, query_x: np.ndarray) -> dict:
    predictions = adapted.predict(query_x)
    if adapted.classes is None:
        return {"values": predictions.tolist()}
    return {
        "classes": list(predictions.classes),
        "labels": predictions.labels,
        "probabilities": predictions.probabilities.tolist(),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Adapter:
    """A Serve replica: one learner, one cache; requests are computed one at a time (torch uses the replica's CPUs)."""

    def __init__(self, args: ServeArgs):
        torch.set_num_threads(max(1, int(args.num_cpus)))
        self.args = args
        self.learner: Learner = load_learner(args.model, bn_stats=args.bn_stats)
        self.held: set[str] = set()  # the keys in the cache (Serve's LRU, which keeps its own to itself)
        self.adaptations = 0
        # The adaptation a request brings to the cache: what the multiplexed loader (which takes only
        # the key) stores on a miss. A context variable: each request is an asyncio task of its own.
        # Made here, in the replica: `python -m platform.serve` pickles this class by value.
        self.fresh: ContextVar[tuple[str, AdaptedModel] | None] = ContextVar("fresh_adaptation", default=None)

        async def cached_task(key: str) -> CachedTask:
            return self._store(key)

        # Serve's LRU of multiplexed models is the cache: what it holds, the router knows and routes to.
        self.cached_task = serve.multiplexed(max_num_models_per_replica=args.cache_size)(cached_task)

    def _store(self, key: str) -> CachedTask:
        """The multiplexed loader: a cache miss stores the request's fresh adaptation."""
        fresh = self.fresh.get()
        if fresh is None:  # a query-only request whose task was evicted while it was being looked up
            raise self._unknown(key)
        self.held.add(key)
        return CachedTask(key, *fresh, on_evict=self.held.discard)

    def _unknown(self, key: str) -> BadRequest:
        capacity = f"never adapted on this replica, or evicted from its cache of {self.args.cache_size}"
        return BadRequest([f"task_id = {key!r}: unknown ({capacity}); send support_x and support_y with it"], 404)

    def _adapt(self, task: TaskRequest) -> AdaptedModel:
        self.adaptations += 1
        return self.learner.adapt(task.support_x, task.support_y, task.steps)

    async def answer(self, task: TaskRequest) -> dict:
        """Predictions for a task, adapting only when its key is not cached with the same support set."""
        digest = None
        if task.support_x is not None:
            steps = self.learner.config.optim.test_inner_steps if task.steps is None else task.steps
            digest = support_digest(task, steps)
        key = task.task_id or digest
        fresh = None
        if key not in self.held:  # checked first: a miss in Serve's LRU evicts a task before loading
            if digest is None:
                raise self._unknown(key)
            fresh = (digest, self._adapt(task))  # bad input raises here, before the cache changes
        token = self.fresh.set(fresh)
        try:
            entry = await self.cached_task(key)
        finally:
            self.fresh.reset(token)
        adapted_now = fresh is not None
        if digest is not None and entry.digest != digest:  # another support set under this task_id
            entry.replace(*(fresh or (digest, self._adapt(task))))  # (fresh: another request stored the key first)
            adapted_now = True
        return {"task_id": key, "adapted": adapted_now, **predictions_json(entry.model, task.query_x)}

    def info(self) -> dict:
        return {
            "model": self.args.model,
            "algorithm": self.learner.config.algorithm,
            "classification": self.learner.classification,
            "head_outputs": self.learner.head_outputs,
            "default_steps": self.learner.config.optim.test_inner_steps,
            "cache": {"tasks": len(self.held), "capacity": self.args.cache_size},
            "adaptations": self.adaptations,
            "rss_bytes": rss_bytes(),
            "limits": self.args.model_dump(include={"max_support", "max_query", "max_ways", "max_steps"}),
        }

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(self.info())
        if request.method != "POST":
            return JSONResponse({"error": f"method {request.method}: use POST (predict) or GET (info)"}, 405)
        try:
            limit = self.args.max_request_bytes
            declared = int(request.headers.get("content-length") or 0)  # refused before it is read
            body = b"" if declared > limit else await request.body()
            if max(declared, len(body)) > limit:
                size = max(declared, len(body))
                raise BadRequest([f"body: {size} bytes; this server takes at most {limit} (max_request_bytes)"], 413)
            routed = serve.get_multiplexed_model_id()  # the ROUTING_HEADER's value, "" without one
            task = parse_task(body, self.args, self.learner.classification, routed)
            return JSONResponse(await self.answer(task))
        except BadRequest as e:
            return JSONResponse({"error": str(e), "problems": e.problems}, e.status)
        except ConfigError as e:  # the learner's InputError: one problem per field
            return JSONResponse({"error": "; ".join(e.problems), "problems": e.problems}, 400)


def build_app(args: ServeArgs | dict) -> serve.Application:
    """The Serve application for `args` (a dict: Serve's CLI and serveConfigV2 pass their `args` so)."""
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    autoscaling = AutoscalingConfig(
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
    )
    deployment = serve.deployment(
        Adapter,
        name="adapter",
        autoscaling_config=autoscaling,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.num_cpus},
    )
    return deployment.bind(args)


app = build_app  # `serve run platform.serve:app model=URI ...`: Serve calls a builder with the CLI's key=value args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve adaptation over HTTP with Ray Serve.")
    parser.add_argument("--model", required=True, help=ServeArgs.model_fields["model"].description)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--route-prefix", default="/")
    for name, field in ServeArgs.model_fields.items():
        if name != "model":
            flag = "--" + name.replace("_", "-")
            kind = str if name == "bn_stats" else type(field.default)
            parser.add_argument(flag, type=kind, default=field.default, help=f"default {field.default}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parsed = vars(_parser().parse_args(argv))
    host, port, route_prefix = parsed.pop("host"), parsed.pop("port"), parsed.pop("route_prefix")
    try:
        args = ServeArgs.model_validate(parsed)
    except ValueError as e:  # pydantic's ValidationError: one problem per field
        raise ConfigError([f"--{str(x['loc'][0]).replace('_', '-')}: {x['msg']}" for x in e.errors()]) from None
    load_learner(args.model, bn_stats=args.bn_stats)  # a bad model location is exit 2 here, not a failing replica
    ray.init()  # joins RAY_ADDRESS, else starts a local instance
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(args), name="metaplatform", route_prefix=route_prefix)
        print(f"serving {args.model} at http://{host}:{port}{route_prefix} (Ctrl-C stops)", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    run(main)
