"""Deploy the serving application (serving/config.yaml) with the given artifacts.

    python -m ray_jobs.deploy --config embedded --ranker data/artifacts/ranker --retriever data/artifacts/retriever
    python -m ray_jobs.deploy --config cluster --ranker ... --retriever ...   # in the cluster (address auto)
    python -m ray_jobs.deploy ... --roll-ranker data/artifacts/ranker-v2     # swap a model in, no restart

It succeeds only when `/healthz` reports both models loaded with the versions written in the given
artifacts' manifests (a version ends with the weights' sha256 prefix; /healthz names no locations). An
artifact that cannot be loaded fails the command (exit 1; the load error is in the replica's log) while
the replicas keep serving the version they had, and the application config is put back to the artifacts they
serve (so a replica started later loads those, not the broken one). Artifacts may be local
folders or s3:// URIs. Without --blocking it returns once the app serves them: on a cluster the app stays up;
on a local Ray started by this command it ends with the command (use --blocking, or `serve run
serving/config.yaml`).
The /events API key is read by the ingress from the env var named by serving.api_key_env. A local Ray started
here gets `serving.deploy.SERVE_PROCESS_ENV` (HAProxy on the HTTP port; a variable already set wins); on a
cluster the nodes' environment decides (k8s/base/rayservice.yaml sets the same).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--ranker", help="ranking artifact folder (default: serving/config.yaml's)")
    parser.add_argument("--retriever", help="retrieval artifact folder (default: serving/config.yaml's)")
    parser.add_argument("--dense-retriever", help="a dense retriever artifact: the dense retrieval channel")
    parser.add_argument("--serve-config", default=None, help="Serve config file (default serving/config.yaml)")
    parser.add_argument("--blocking", action="store_true", help="keep serving until interrupted")
    parser.add_argument("--roll-ranker", help="after deploying, roll this ranker artifact in (user_config)")
    args = parser.parse_args(argv)
    cfg = config.from_args(args)

    from ray_jobs.runtime import init_ray
    from serving.deploy import (
        CONFIG_PATH,
        SERVE_PROCESS_ENV,
        base_url,
        deploy,
        deployed_app,
        restore,
        serve_config,
        set_user_config,
        shutdown,
        wait_for_versions,
    )

    def local(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).resolve())

    from training.artifact import artifact_version

    ranker, retriever, dense = local(args.ranker), local(args.retriever), local(args.dense_retriever)
    if dense and not retriever:
        parser.error("--dense-retriever needs --retriever (the generative channel) beside it")
    try:  # before touching Serve: a missing or unreadable manifest changes nothing
        expected = {name: artifact_version(path) for name, path in (("ranker", ranker), ("retriever", retriever))
                    if path}
        if dense:  # the retriever stage then serves both models (serving.retriever.RetrievalChannels)
            expected["retriever"] = f"{expected['retriever']}+{artifact_version(dense)}"
    except (OSError, ValueError, KeyError) as err:
        print(f"deploy failed: cannot read an artifact's manifest: {err}", file=sys.stderr)
        return 1
    if not cfg.ray.address:  # a local Ray starts here: give its processes the serving environment
        for name, value in SERVE_PROCESS_ENV.items():
            os.environ.setdefault(name, value)
    init_ray(cfg.ray)
    sc = serve_config(args.serve_config or CONFIG_PATH, config=args.config or "embedded", overrides=args.overrides,
                      ranker=ranker, retriever=retriever, dense_retriever=dense, host=cfg.serving.host,
                      port=cfg.serving.port, base_dir=str(Path.cwd()))
    t = time.perf_counter()
    previous = deployed_app()
    deploy(sc)
    url = base_url(sc)
    try:
        health = wait_for_versions(url, expected)
        print(json.dumps({"url": url, "docs": f"{url}/docs", "seconds": round(time.perf_counter() - t, 1),
                          "health": health}, indent=1))
        if args.roll_ranker:
            rolled = local(args.roll_ranker)
            expected = {"ranker": artifact_version(rolled)}
            previous = deployed_app()
            sc = set_user_config(sc, "Ranker", artifact=rolled)
            print(json.dumps({"rolled": wait_for_versions(url, expected)["model_versions"]}))
    except (RuntimeError, TimeoutError, OSError, ValueError) as err:
        print(f"deploy failed: {err}", file=sys.stderr)
        if previous is not None:
            restore(sc, previous)
            print("deploy rolled back: the application config names the artifacts it served before again",
                  file=sys.stderr)
        return 1
    if args.blocking:
        # `serve run` style: SIGTERM (what a non-interactive shell sends) and Ctrl-C both end it cleanly.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        print(f"serving at {url}; Ctrl-C or SIGTERM to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        shutdown()
    elif not cfg.ray.address:
        print("note: local Ray started by this command; the app stops when it exits (use --blocking)")
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
