"""Path templating: shape parameters, learned ones, their names, and the bounds."""

from __future__ import annotations

import random
import string

import pytest

from collector.inventory import templates as t
from collector.inventory.templates import Learner, View


@pytest.mark.parametrize("segment, kind", [
    ("42", t.ID), ("-7", t.ID), ("0.001", t.ID),
    ("3f2504e0-4f89-11d3-9a0c-0305e82c3301", t.UUID),
    ("2024-05-01", t.DATE), ("2024-05-01T12:00:00Z", t.DATE),
    ("9f86d081884c7d659a2feaa0c55ad015", t.TOKEN),          # hex digest
    ("aGVsbG8gd29ybGQ=", t.TOKEN),                          # padded base64
    ("dGhpc0lzQVRva2VuMTIz", t.TOKEN),                      # base64, mixed case and digits
    ("users", None), ("v1", None), ("robots.txt", None), ("getUserProfileSettings", None),
    ("deadbeefdeadbeef", None),                             # hex letters only: a word
    ("image", None), ("auth-int", None),
])
def test_classify(segment, kind):
    assert t.classify(segment) == kind


def _word(rng):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(8))


def _template(learner, service, path):
    return View(learner).template(service, learner.learn(service, path))


def test_many_rare_values_make_a_parameter_and_repeated_routes_do_not():
    rng = random.Random(1)
    learner = Learner()
    routes = [f"/{_word(rng)}" for _ in range(40)]       # 40 fixed routes, each hit often
    keys = []
    for i in range(2000):
        keys.append(learner.learn("s:80", rng.choice(routes)))
        keys.append(learner.learn("s:80", f"/users/{_word(rng)}/profile"))
    view = View(learner)
    templates = {view.template("s:80", k) for k in keys}
    assert ("users", t.NAME, "profile") in templates
    assert {r[1:] for r in routes} <= {tpl[0] for tpl in templates if len(tpl) == 1}
    assert len(templates) == 41


def test_few_values_stay_static_whatever_their_traffic():
    learner = Learner()
    for fmt in ("png", "jpeg", "svg", "webp"):   # each seen once: still a route set
        learner.learn("s:80", f"/image/{fmt}")
    assert _template(learner, "s:80", "/image/png") == ("image", "png")


def test_learned_position_is_judged_over_all_parents():
    # /basic-auth/<user>/<passwd>: each password sits under its own user; the passwords
    # are judged together once the users are a parameter.
    learner = Learner()
    rng = random.Random(2)
    keys = [learner.learn("s:80", f"/basic-auth/{_word(rng)}/{_word(rng)}") for _ in range(30)]
    view = View(learner)
    assert {view.template("s:80", k) for k in keys} == {("basic-auth", t.NAME, t.NAME)}
    assert t.render(("basic-auth", t.NAME, t.NAME)) == "/basic-auth/{name}/{name2}"


def test_param_names_are_unique_and_follow_the_preceding_segment():
    assert t.render(("users", t.ID, "orders", t.ID)) == "/users/{id}/orders/{order_id}"
    assert t.render(("links", t.ID, t.ID)) == "/links/{id}/{id2}"
    assert t.render(()) == "/"


def test_split_target():
    assert t.split_target("/a/b?x=1#f") == ("/a/b", "x=1")
    assert t.split_target("http://h:8080/a?q") == ("/a", "q")
    assert t.split_target("http://h") == ("/", "")
    assert t.segments("/a//b/") == ["a", "b"]


def test_a_prefix_remembers_at_most_max_values():
    learner = Learner(max_values=50)
    for i in range(10_000):
        learner.learn("s:80", f"/files/{_word(random.Random(i))}x/meta")
    # root, files, {name}, meta: the 10,000 values were folded and forgotten.
    assert learner.nodes <= 4 + 50
    assert View(learner).template("s:80", learner.learn("s:80", "/files/abc/meta")) == (
        "files", t.NAME, "meta")


def test_node_cap_sends_new_values_to_a_parameter_and_counts_them():
    learner = Learner(max_nodes=20)
    keys = [learner.learn("s:80", f"/r{i}") for i in range(40)]
    assert learner.nodes <= 21
    assert learner.overflow == 40 - 19
    assert keys[-1] == (t.NAME,)


def test_deep_paths_end_in_rest():
    learner = Learner()
    key = learner.learn("s:80", "/" + "/".join(f"s{i}" for i in range(40)))
    assert len(key) == t.MAX_DEPTH + 1 and key[-1] == t.REST
