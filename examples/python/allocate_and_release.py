"""A scheduler's use of MoltenIron from Python: nodes for a job, then back to the pool.

    MOLTENIRON_AMQP_URL=amqp://ci:PASSWORD@mq.example:5672/molteniron \
        python allocate_and_release.py job-42
"""

import os
import sys

from molteniron import errors
from molteniron.clients.client import MoltenIronClient

owner = sys.argv[1]
with MoltenIronClient(os.environ["MOLTENIRON_AMQP_URL"], timeout=30) as client:
    try:
        reply = client.allocate(owner, 1, node_pool="default", wait=600)
    except errors.BrokerUnusable as exc:  # refused login, untrusted certificate: fix config
        sys.exit(f"MoltenIron refused us: {exc.message}")
    except errors.ServiceUnavailable as exc:  # no broker, or no worker answers: retry later
        sys.exit(f"MoltenIron is unavailable: {exc.message}")
    except errors.MoltenIronError as exc:  # the worker said no: exc.status and exc.kind say why
        sys.exit(f"no nodes for {owner} ({exc.status} {exc.kind}): {exc.message}")
    try:
        for node in reply["nodes"].values():
            print(node["name"], node["ipmi_ip"])  # ... run the job on them
    finally:
        client.release(owner)
