"""Deploy the serving application (serving/config.yaml) with the given artifacts.

    python -m ray_jobs.deploy --config embedded --ranker data/artifacts/ranker --retriever data/artifacts/retriever
    python -m ray_jobs.deploy --config cluster --ranker ... --retriever ...   # in the cluster (address auto)
    python -m ray_jobs.deploy ... --roll-ranker data/artifacts/ranker-v2     # swap a model in, no restart

Without --blocking it returns once the app is RUNNING: on a cluster the app stays up; on a local Ray started
by this command it ends with the command (use --blocking, or `serve run serving/config.yaml`).
The /events API key is read by the ingress from the env var named by serving.api_key_env.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--serve-config", default=None, help="Serve config file (default serving/config.yaml)")
    parser.add_argument("--blocking", action="store_true", help="keep serving until interrupted")
    parser.add_argument("--roll-ranker", help="after deploying, roll this ranker artifact in (user_config)")
    args = parser.parse_args(argv)
    cfg = config.from_args(args)

    from ray_jobs.runtime import init_ray
    from serving.deploy import CONFIG_PATH, base_url, deploy, serve_config, set_user_config, shutdown

    def local(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).resolve())

    init_ray(cfg.ray)
    sc = serve_config(args.serve_config or CONFIG_PATH, config=args.config or "embedded", overrides=args.overrides,
                      ranker=local(args.ranker), retriever=local(args.retriever), host=cfg.serving.host,
                      port=cfg.serving.port, base_dir=str(Path.cwd()))
    t = time.perf_counter()
    deploy(sc)
    url = base_url(sc)
    import httpx

    health = httpx.get(f"{url}/healthz", timeout=30).json()
    print(json.dumps({"url": url, "docs": f"{url}/docs", "seconds": round(time.perf_counter() - t, 1),
                      "health": health}, indent=1))
    if args.roll_ranker:
        sc = set_user_config(sc, "Ranker", artifact=local(args.roll_ranker))
        print(json.dumps({"rolled": httpx.get(f"{url}/healthz", timeout=30).json()["model_versions"]}))
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
