from __future__ import annotations

import attrs
import pytest

from selfflow.registry.config import ConfigError
from selfflow.registry.registry import Register, Registry, RegistryError


@attrs.frozen(kw_only=True)
class Opts:
    size: int = attrs.field(default=4, validator=attrs.validators.ge(1))


def test_duplicate_names_name_both_plugins():
    reg = Registry("dataset")
    Register(reg, "alpha").add("image/foo", lambda c: c, Opts, "one")
    with pytest.raises(RegistryError) as err:
        reg.add("image/foo", lambda c: c, Opts, "two", plugin="beta")
    assert "'alpha'" in str(err.value) and "'beta'" in str(err.value)


def test_a_plugins_register_refuses_a_taken_name_and_keeps_going():
    reg = Registry("dataset")
    Register(reg, "alpha").add("image/foo", lambda c: c, Opts, "one")
    beta = Register(reg, "beta")
    beta.add("image/foo", lambda c: c, Opts, "two")
    beta.add("image/bar", lambda c: c, Opts, "three")
    assert reg.get("image/foo").plugin == "alpha" and reg.get("image/foo").doc == "one"
    assert reg.get("image/bar").plugin == "beta" and beta.added == ["image/bar"]
    assert beta.refused == [
        "dataset 'image/foo' is registered twice: by plugin 'alpha' and by plugin 'beta'; "
        "'alpha' keeps it, this entry was refused"
    ]


def test_unknown_names_list_the_closest():
    reg = Registry("dataset")
    for name in ("image/mnist", "image/digits", "audio/spoken-digits"):
        Register(reg, "p").add(name, lambda c: c)
    with pytest.raises(RegistryError) as err:
        reg.get("image/mnsit")
    assert "did you mean 'image/mnist'" in str(err.value)
    with pytest.raises(RegistryError) as err:
        reg.get("video/digits")
    assert "'image/digits'" in str(err.value)


def test_build_validates_options_by_the_config_class():
    reg = Registry("tokenizer")
    Register(reg, "p").add("image/x", lambda c, **ctx: (c, ctx), Opts)
    cfg, ctx = reg.build("image/x", {"size": 8}, split="train")
    assert cfg == Opts(size=8) and ctx == {"split": "train"}
    with pytest.raises(ConfigError, match=r"'tokenizer 'image/x'.sise': unknown key; did you mean .*size"):
        reg.build("image/x", {"sise": 8})
    with pytest.raises(ConfigError, match="size"):
        reg.build("image/x", {"size": 0})
    with pytest.raises(ConfigError, match="expected an integer"):
        reg.build("image/x", {"size": "big"})


def test_entries_take_attrs_config_classes_only():
    with pytest.raises(TypeError, match="attrs class"):
        Register(Registry("metric"), "p").add("image/m", lambda c: c, dict)
