"""Issue 18 §5: hosts carry a region; a create may ask for one; two local hosts in two regions."""

from __future__ import annotations

import pytest

from tests.conftest import post_json
from tests.test_multihost import _host_of, _set_host, _works


@pytest.fixture
def two_regions(service, second_host):
    """local-1 in the default region (registered without one), local-2 in eu-west-1."""
    _set_host(service, "local-2", region="eu-west-1")
    return service.settings.default_region


def _create(client, **body):
    return post_json(client, "/api/v1/database", {"ref": "regions", **body})


def test_a_create_goes_to_the_region_it_asks_for(client, two_regions):
    asked = _create(client, region="eu-west-1")
    assert asked.status_code == 201, asked.json_body
    assert _host_of(asked.json_body["id"]) == "local-2"
    assert _works(asked.json_body)
    for _ in range(3):  # no region: the default one, though local-2 has as much room
        assert _host_of(_create(client).json_body["id"]) == "local-1"
    assert _host_of(_create(client, region=two_regions).json_body["id"]) == "local-1"


def test_unknown_or_malformed_region(client, two_regions):
    unknown = _create(client, region="mars-1")
    assert unknown.status_code == 422
    assert unknown.json_body["error"] == "Unknown region 'mars-1'"
    assert unknown.json_body["regions"] == sorted([two_regions, "eu-west-1"])
    assert unknown.json_body["hint"]
    for bad, status in ((5, 400), ("EU West", 400), ("", 400)):
        response = _create(client, region=bad)
        assert response.status_code == status, (bad, response.json_body)
        assert "region" in response.json_body["error"]


def test_a_full_region_is_a_422_naming_the_regions_with_room(client, service, two_regions):
    _set_host(service, "local-2", capacity=0)
    full = _create(client, region="eu-west-1")
    assert full.status_code == 422
    assert full.json_body["error"] == "No capacity in region 'eu-west-1'"
    assert full.json_body["regions"] == [two_regions]
    # The default region full: 503 as before regions, with where there is room.
    _set_host(service, "local-2", capacity=1000)
    _set_host(service, "local-1", capacity=0)
    default_full = _create(client)
    assert default_full.status_code == 503 and default_full.json_body["error"] == "No capacity"
    assert default_full.json_body["regions"] == ["eu-west-1"]
    assert default_full.headers["Retry-After"] == "60"


def test_pool_takes_respect_the_region(client, service, two_regions):
    from chalicelib import pool
    from chalicelib.clock import Deadline
    from chalicelib.pooled import pooled

    summary = pool.refill(service, Deadline.after(60), size=1)
    assert summary.added == 2
    taken = _create(client, region="eu-west-1")
    assert taken.status_code == 201
    assert _host_of(taken.json_body["id"]) == "local-2"
    assert len(pooled("local-2")) == 0 and len(pooled("local-1")) == 1  # the default region's pool untouched
    assert _works(taken.json_body)


def test_every_answer_about_a_database_names_its_region(client, two_regions):
    """The create's 201, the public GET, the claim, the owner's list and details, a copy and its reset."""
    from tests.test_claim import bearer, claim, signup

    eu = _create(client, region="eu-west-1")
    assert eu.status_code == 201 and eu.json_body["region"] == "eu-west-1"
    default = _create(client)
    assert default.status_code == 201 and default.json_body["region"] == two_regions != "eu-west-1"
    assert client.http.get(f"/api/v1/database/{eu.json_body['id']}").json_body["region"] == "eu-west-1"

    key = signup(client)
    claimed = claim(client, eu.json_body["id"], key)
    assert claimed.status_code == 200 and claimed.json_body["region"] == "eu-west-1"
    listed = client.http.get("/api/v1/databases", headers=bearer(key)).json_body["databases"]
    assert [(d["id"], d["region"]) for d in listed] == [(eu.json_body["id"], "eu-west-1")]
    details = client.http.get(f"/api/v1/databases/{eu.json_body['id']}", headers=bearer(key))
    assert details.json_body["region"] == "eu-west-1"

    copy = post_json(client, f"/api/v1/databases/{eu.json_body['id']}/copies", {}, headers=bearer(key))
    assert copy.status_code == 201 and copy.json_body["region"] == "eu-west-1"  # on its source's host
    reset = post_json(client, f"/api/v1/databases/{copy.json_body['id']}/reset", {}, headers=bearer(key))
    assert reset.status_code == 200 and reset.json_body["region"] == "eu-west-1"
