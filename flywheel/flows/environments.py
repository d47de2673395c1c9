"""Where the ARMAP and planner runs' agent acts: `ENVIRONMENTS`, a fixed registry of the
environments implemented here (`shop`, the default, and `grid`), so run parameters
never name code; and the two parameters those runs share, the environment and the
acting LLM."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from flywheel.environments import grid
from flywheel.llm import BackendSpec
from flywheel.synthesis.armap import EnvironmentEntry
from flywheel.world import shop_agent, shop_env
from flywheel.world.bootstrap import models_root, shop_agent_dir


class ShopSettings(BaseModel):
    """The shop's own settings, for runs that build it (`environment='shop'`)."""

    catalog_size: int = Field(120, ge=5, description="the shop's items (environment 'shop')")
    catalog_seed: int = Field(0, description="the shop's catalog (environment 'shop')")
    price_slack: int = Field(
        15, ge=0, description="the shop's refined bound: price + randint(0, slack)"
    )


ENVIRONMENTS: dict[str, EnvironmentEntry] = {
    "shop": EnvironmentEntry(
        build=lambda c: shop_env.ShopEnvironment.from_settings(  # c: ShopSettings
            c.catalog_size, c.catalog_seed, c.price_slack
        ),
        held_out=shop_env.held_out_tasks,
        modules=(shop_env, shop_agent),
    ),
    "grid": EnvironmentEntry(
        build=lambda c: grid.GridEnvironment(),
        held_out=grid.held_out_tasks,
        modules=(grid,),
    ),
}
EnvironmentName = Literal["shop", "grid"]


def shop_agent_spec() -> BackendSpec:
    return BackendSpec(model=str(shop_agent_dir(models_root())))


# the parameters `environment` and `agent`, declared once for every run that acts
EnvironmentField = Annotated[
    EnvironmentName,
    Field(description="where the agent acts: 'shop' (the built-in world) or 'grid'"),
]
AgentField = Annotated[
    BackendSpec,
    Field(
        default_factory=shop_agent_spec,
        description="the acting LLM (the default is the shop agent: give one for 'grid')",
    ),
]

__all__ = [
    "ENVIRONMENTS",
    "AgentField",
    "EnvironmentField",
    "EnvironmentName",
    "ShopSettings",
    "shop_agent_spec",
]
