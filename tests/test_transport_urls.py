"""Broker URLs with mqtts:// (issue 20, item 2) and the processes' BLAS threading (item 1)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from fleetfl.shared.net.broker_url import BrokerURL, parse_broker_url
from fleetfl.shared.threads import blas_threads


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtts://broker.local", BrokerURL("broker.local", 8883, tls=True)),
    ("mqtts://broker.local:9999", BrokerURL("broker.local", 9999, tls=True)),
    (" MQTTS://[::1]/ ", BrokerURL("::1", 8883, tls=True)),
    ("mqtt://broker.local", BrokerURL("broker.local", 1883)),
    ("broker.local:8883", BrokerURL("broker.local", 8883)),  # no scheme: plain, as before
])
def test_mqtts_urls(url, expected):
    assert parse_broker_url(url) == expected


def test_mqtts_url_str_round_trips():
    for text in ("mqtts://host:8883", "mqtts://[::1]:8883", "mqtt://host:1883"):
        assert str(parse_broker_url(text)) == text
        assert parse_broker_url(str(parse_broker_url(text))) == parse_broker_url(text)


@pytest.mark.parametrize("url", ["ws://host:1883", "mqtt+ssl://host", "tls://host"])
def test_other_schemes_are_refused_naming_both(url):
    with pytest.raises(ValueError, match=r"scheme .*mqtt://HOST:PORT or mqtts://HOST:PORT"):
        parse_broker_url(url)


def test_broker_help_names_mqtts():
    out = subprocess.run([sys.executable, "-m", "fleetfl.coordinator.cli", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    assert "mqtts://" in out and "8883" in out and "system CA store" in out


def test_blas_threads_choice():
    assert blas_threads({}) == 1
    assert blas_threads({"FL_BLAS_THREADS": "2"}) == 2
    assert blas_threads({"OPENBLAS_NUM_THREADS": "3"}) == 3  # the user's, respected
    assert blas_threads({"FL_BLAS_THREADS": "2", "OPENBLAS_NUM_THREADS": "3"}) == 2
    assert blas_threads({"FL_BLAS_THREADS": "zero"}) == 1


def test_limit_reaches_numpy_already_loaded_and_children():
    """In a fresh process: numpy (and its OpenBLAS) loaded first, as the CLIs' imports do,
    then the call the CLIs make first in main()."""
    code = (
        "import numpy, os\n"
        "from threadpoolctl import threadpool_info\n"
        "from fleetfl.shared.threads import limit_blas_threads\n"
        "assert limit_blas_threads() == 1\n"
        "pools = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "print(pools, os.environ['OPENBLAS_NUM_THREADS'])\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "FL_BLAS_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, check=True).stdout
    pools, var = out.rsplit(" ", 1)
    assert var.strip() == "1" and pools.startswith("[1") and set(ast.literal_eval(pools)) == {1}
