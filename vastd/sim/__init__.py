"""The local simulator of vast.ai (README: `vastd demo`): a fake API and local SSH hosts."""

from vastd.sim.api import Fault, Faults, HostProvider, SimCloud, create_sim_app, start_sim_api

__all__ = ["Fault", "Faults", "HostProvider", "SimCloud", "create_sim_app", "start_sim_api"]
