"""What a newcomer sees of every flow: defaults the UI shows and pre-fills, logs without
the bytecode `dill` prints when `datasets.map` hashes a function, and the effective
parameters recorded on the run."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flywheel.flows.deployments import FLOWS, deployments
from flywheel.flows.world import bootstrap
from flywheel.world.bootstrap import BootstrapConfig

DEPLOYMENTS = deployments()


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_every_flow_has_its_defaults_in_the_signature(deployment) -> None:
    schema = deployment._parameter_openapi_schema.model_dump()
    params = schema["properties"]["params"]
    assert schema.get("required", []) == []
    default = params["default"]  # what the UI's custom-run form pre-fills
    assert isinstance(default, dict) and default
    # every nested backend spec comes filled in: no empty required "model" field
    for value in default.values():
        for spec in value if isinstance(value, list) else [value]:
            if isinstance(spec, dict) and "kind" in spec and "model" in spec:
                assert spec["model"], (deployment.name, spec)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d.name)
def test_no_flow_turns_prints_into_run_logs(deployment) -> None:
    # under log_prints=True every datasets.map call filled the run log with the bytecode
    # that dill prints while hashing the mapped function (450 of 462 lines of reward/train)
    (flow,) = [f for name, f in FLOWS.items() if name.split("/")[1] == deployment.name]
    assert not flow.log_prints


def test_the_effective_parameters_are_an_artifact_of_the_run(prefect_api, data_dir) -> None:
    config = BootstrapConfig(
        small_steps=2,
        large_steps=2,
        small_min_accuracy=0,
        large_min_accuracy=0,
        eval_tasks=4,
        shop_agent_steps=2,
        shop_agent_eval_intents=0,
    )
    bootstrap(config)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["world-bootstrap-parameters"])
            )
        )
    assert artifacts, "no parameters artifact"
    text = str(artifacts[-1].data)
    # the defaults the caller left out are there too
    assert '"small_steps": 2' in text and '"batch_size": 32' in text and '"force": false' in text


def _params_model(flow):
    import inspect

    (param,) = inspect.signature(flow.fn).parameters.values()
    return param.annotation if not isinstance(param.annotation, str) else type(param.default)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_every_flow_refuses_unknown_parameters_by_name(name) -> None:
    from pydantic import BaseModel, ValidationError

    model = _params_model(FLOWS[name])
    assert issubclass(model, BaseModel)
    with pytest.raises(ValidationError, match="max_lenght") as err:
        model.model_validate({"max_lenght": 512})
    assert "Extra inputs are not permitted" in str(err.value)
    # nested configs (backend specs and the like) refuse them too
    for field in model.model_fields:
        value = getattr(model(), field)
        nested = value[0] if isinstance(value, list) and value else value
        if isinstance(nested, BaseModel):
            data = nested.model_dump() | {"not_a_field": 1}
            with pytest.raises(ValidationError, match="not_a_field"):
                type(nested).model_validate(data)


def test_each_deployment_is_declared_once_and_the_nightly_order_follows_the_list() -> None:
    from flywheel.flows.deployments import DEPLOYMENTS as DECLARED
    from flywheel.flows.deployments import NIGHTLY

    names = [d.name for d in DECLARED]
    assert len(set(names)) == len(names) == len(DEPLOYMENTS)
    # "M H * * *": each deployment runs after the one before it in the list
    minutes = [int(h) * 60 + int(m) for m, h, *_ in (cron.split() for _, cron in NIGHTLY)]
    assert minutes == sorted(minutes) and len(set(minutes)) == len(minutes)
    for declared, served in zip(DECLARED, DEPLOYMENTS, strict=True):
        assert (declared.entry.name, served.name) == tuple(declared.name.split("/"))


def test_a_flow_whose_signature_is_not_its_deployments_is_refused() -> None:
    from flywheel.flows.tracking import Deployment, FlowRun

    declared = Deployment("world/example", "Example", BootstrapConfig)

    def no_run(params: BootstrapConfig) -> dict:
        return {}

    def extra(params: BootstrapConfig, extra: int, run: FlowRun) -> dict:
        return {}

    with pytest.raises(TypeError, match=r"world/example.*takes \(params, run\), got \(params\)"):
        declared.flow(no_run)
    with pytest.raises(TypeError, match=r"takes \(params, run\), got \(params, extra, run\)"):
        declared.flow(extra)
    with pytest.raises(TypeError, match=r"takes \(params, <inputs>, run\), got \(params\)"):
        declared.flow(check=lambda params: None)(no_run)
    assert declared.entry is None


def test_a_flow_runs_its_check_first_and_prefect_sees_one_parameter(prefect_api, data_dir) -> None:
    import inspect

    from flywheel.flows.tracking import Deployment, FlowRun
    from flywheel.store import sql

    declared = Deployment("world/example", "Example", BootstrapConfig)
    seen: list = []

    @declared.flow(check=lambda params: params.small_steps * 2)
    def example(params: BootstrapConfig, doubled: int, run: FlowRun) -> dict:
        """An example flow."""
        seen.append((doubled, run.name))
        return run.summary({"doubled": doubled})

    (param,) = inspect.signature(example.fn).parameters.values()
    assert (param.name, param.default) == ("params", declared.defaults)
    assert example.name == "world" and example.__doc__ == "An example flow."
    figures = example(BootstrapConfig(small_steps=3))
    assert seen == [(6, "world/example")] and figures["doubled"] == 6
    runs = sql("SELECT status FROM runs WHERE flow = 'world/example'")
    assert runs.status.tolist() == ["completed"]
