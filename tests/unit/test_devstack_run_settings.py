"""make run's own settings (devstack.run_settings): its ports, and its names' prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devstack.run_settings import PORT_SETTINGS, chosen_ports, names_prefix
from devstack.stack import DEFAULT_PORTS


def test_unset_or_empty_the_ports_are_the_shops_defaults():
    assert chosen_ports(DEFAULT_PORTS, {}) == DEFAULT_PORTS
    assert chosen_ports(DEFAULT_PORTS, dict.fromkeys(PORT_SETTINGS.values(), " ")) == DEFAULT_PORTS


def test_each_port_of_make_run_is_set_by_its_own_variable():
    """Port 8000 taken on a developer's machine (another project's server): make run had no way
    to serve elsewhere. Every port it serves on has a variable, each of them read."""
    given = {variable: str(18000 + n) for n, variable in enumerate(PORT_SETTINGS.values())}

    ports = chosen_ports(DEFAULT_PORTS, given)

    assert {PORT_SETTINGS[name]: str(port) for name, port in ports.items()} == given
    assert set(PORT_SETTINGS) == set(DEFAULT_PORTS)


@pytest.mark.parametrize("value", ["http", "80.5", "0", "65536", "-1"])
def test_a_value_that_is_no_port_is_refused_naming_its_variable(value):
    with pytest.raises(RuntimeError, match=f"^GATEWAY_PORT='{value}': expected a port number from"
                                           " 1 to 65535$"):
        chosen_ports(DEFAULT_PORTS, {"GATEWAY_PORT": value})


def test_a_port_given_to_two_servers_is_refused_naming_both():
    """The gateway moved onto the orders API's default port would have one of them fail to bind,
    or the health checks answered by the wrong one."""
    with pytest.raises(RuntimeError, match=r"^port 8001 is given to more than one server:"
                                           r" GATEWAY_PORT and orders \(by default; ORDERS_PORT\);"
                                           " set each its own$"):
        chosen_ports(DEFAULT_PORTS, {"GATEWAY_PORT": "8001"})
    with pytest.raises(RuntimeError, match="^port 9000 is given to more than one server:"
                                           " ORDERS_PORT and PAYMENTS_PORT;"):
        chosen_ports(DEFAULT_PORTS, {"ORDERS_PORT": "9000", "PAYMENTS_PORT": "9000"})


def test_the_names_prefix_is_hseshop_unless_set():
    assert names_prefix({}) == names_prefix({"HSESHOP_PREFIX": ""}) == "hseshop"
    assert names_prefix({"HSESHOP_PREFIX": "hseshop_second"}) == "hseshop_second"


@pytest.mark.parametrize("value", ["Shop", "1shop", "shop-two", "shop two", "a" * 55])
def test_a_names_prefix_no_database_name_can_begin_with_is_refused(value):
    with pytest.raises(RuntimeError, match=f"^HSESHOP_PREFIX='{value}': expected a lowercase"):
        names_prefix({"HSESHOP_PREFIX": value})


def test_the_readme_names_each_setting_of_make_run_with_its_default():
    """README's "The two commands" is where a developer whose port 8000 is taken looks."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = " ".join(readme.split("\n## The two commands\n", 1)[1].split("\n## ", 1)[0].split())

    for name, variable in PORT_SETTINGS.items():
        assert re.search(rf"`{variable}` \([^)]*\b{DEFAULT_PORTS[name]}\b", section), variable
    assert "`HSESHOP_PREFIX`" in section
