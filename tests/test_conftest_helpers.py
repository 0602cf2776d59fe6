"""The "needs program X" helper: skip with the reason on a developer's machine, fail in CI."""

import pytest

import conftest


def test_missing_program_skips_with_the_package_outside_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="dnsmasq \\(Debian package dnsmasq-base\\) is not installed"):
        monkeypatch.setenv("PATH", "/nonexistent")
        monkeypatch.setattr(conftest.os, "access", lambda *a: False)
        conftest.requires("dnsmasq")


def test_missing_program_fails_in_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="needed in CI: no-such-program-for-meshproxy \\(Debian package no-such-program-for-meshproxy\\) is not installed"):
        conftest.requires("no-such-program-for-meshproxy")


def test_present_program_is_found():
    assert conftest.requires("sh").endswith("/sh")
