"""`jam deploy`: the pipeline as a deployment on a Prefect process work pool, plus the automations that recover it.

Any machine with a checkout runs its flow runs: `JAM_HOME=$PWD prefect worker start --pool jam`. The deployment
names no path of its own: its one pull step changes into `$JAM_HOME` on the worker, so each machine runs the code
and params of its own checkout, and a replacement machine in another folder works the same.

Recovery without a person is two Prefect automations, evaluated by the Prefect server (the one service that must
outlive the spot machines anyway, so no extra process has to be kept alive):
- no heartbeat from a running flow run for `ZOMBIE_HEARTBEATS` beats (its machine vanished) -> mark it Crashed;
- a flow run of this deployment Crashed (that, or its worker saw the process die) -> run the deployment again.
Any worker of the pool picks the new run up; training resumes from the S3 checkpoint and its MLflow run.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any
from uuid import UUID

from pipeline.core.config import Config

ENTRYPOINT = "flows/main.py:jam_pipeline"
HOME_ENV = "JAM_HOME"  # the worker's checkout; the pull step changes into it
HEARTBEAT_S = 30  # seconds between flow-run heartbeats (Prefect's minimum)
ZOMBIE_HEARTBEATS = 3  # missed heartbeats before a running flow run counts as dead
ENDED = ("Completed", "Failed", "Cancelled", "Crashed")


def _ensure_pool(client, name: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with contextlib.suppress(ObjectAlreadyExists):  # an existing pool keeps its settings
        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


def _deployment(client, cfg: Config, params: str, until: str | None) -> UUID:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.utilities.callables import parameter_schema

    from flows.main import jam_pipeline

    flow_id = client.create_flow(jam_pipeline)
    return client.create_deployment(
        flow_id=flow_id,
        name=cfg.services.deployment,
        entrypoint=ENTRYPOINT,
        work_pool_name=cfg.services.work_pool,
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": f"{{{{ ${HOME_ENV} }}}}"}}],
        parameters={"params": params, "until": until},
        parameter_openapi_schema=parameter_schema(jam_pipeline).model_dump_for_openapi(),
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
        # one run at a time: two (a double click, a re-run racing a late worker) must not train the same
        # fingerprint at once or interleave checkpoint uploads; the second waits for the first
        concurrency_limit=1,
        concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
    )


def automations(deployment_id: UUID, name: str) -> list[Any]:
    """The two automations of the module docstring, scoped to flow runs of `deployment_id`."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    runs = {"prefect.resource.id": "prefect.flow-run.*"}
    ours = {"prefect.resource.role": "deployment", "prefect.resource.id": f"prefect.deployment.{deployment_id}"}
    zombie = EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ENDED)},
        match=runs,
        match_related=ours,
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=HEARTBEAT_S * ZOMBIE_HEARTBEATS),
    )
    crashed = EventTrigger(
        expect={"prefect.flow-run.Crashed"}, match=runs, match_related=ours, posture=Posture.Reactive, threshold=1
    )
    mark = ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: its machine is gone")
    rerun = RunDeployment(source="selected", deployment_id=deployment_id)
    return [
        AutomationCore(name=f"{name}: no heartbeat -> crashed", trigger=zombie, actions=[mark]),
        AutomationCore(name=f"{name}: crashed -> run again", trigger=crashed, actions=[rerun]),
    ]


def deploy(cfg: Config, params: str = "params.yaml", until: str | None = None) -> dict[str, Any]:
    """Create or update the work pool, the deployment and its automations on the Prefect API (PREFECT_API_URL).

    Args:
        cfg: the profile (services.work_pool, services.deployment).
        params: the params file a worker reads, relative to its checkout (or absolute).
        until: the deployment's default last stage (None: the whole pipeline).

    Returns:
        {"pool", "deployment" (flow/deployment name), "deployment_id", "automations" (names)}.
    """
    from prefect.client.orchestration import get_client

    name = f"jam-pipeline/{cfg.services.deployment}"
    with get_client(sync_client=True) as client:
        _ensure_pool(client, cfg.services.work_pool)
        deployment_id = _deployment(client, cfg, params, until)
        made = []
        for automation in automations(deployment_id, name):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)  # re-deploying replaces, never duplicates
            client.create_automation(automation)
            made.append(automation.name)
    return {"pool": cfg.services.work_pool, "deployment": name, "deployment_id": str(deployment_id),
            "automations": made}  # fmt: skip
