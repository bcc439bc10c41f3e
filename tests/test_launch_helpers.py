"""tests/_launch.py itself: master ports are never handed out twice, and two pytest-xdist workers draw from disjoint
blocks (``make test`` runs launched tests on two workers at once)."""

import socket

import _launch


def _ports(monkeypatch, worker: str, n: int) -> list[int]:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setattr(_launch, "_ports_handed", 0)
    return [_launch.free_port() for _ in range(n)]


def test_free_port_is_never_repeated_and_workers_use_disjoint_blocks(monkeypatch):
    gw0, gw1 = _ports(monkeypatch, "gw0", 60), _ports(monkeypatch, "gw1", 60)
    assert len(set(gw0)) == 60 and len(set(gw1)) == 60, "a port was handed out twice"
    assert all(p % 2 == 0 for p in gw0 + gw1)  # port + 1 stays free for a second listener
    block = _launch._PORT_BLOCK
    assert {(p - _launch._PORT_BASE) // block for p in gw0} == {0}
    assert {(p - _launch._PORT_BASE) // block for p in gw1} == {1}
    assert max(gw0 + gw1) < 32768  # below Linux's ephemeral range: never a port bind(0) or gloo may be holding


def test_free_port_skips_a_port_in_use(monkeypatch):
    first, second = _ports(monkeypatch, "gw2", 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", first))
        s.listen()
        monkeypatch.setattr(_launch, "_ports_handed", 0)  # the same candidates again: the first one is taken
        assert _launch.free_port() == second
