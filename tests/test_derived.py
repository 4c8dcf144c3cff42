from tpusim.derived import _derived, derived_from


def test_derived_values_are_made_once_per_owner_and_tag_and_go_with_the_owner():
    class Owner:
        pass

    owner, made = Owner(), []

    def make():
        made.append(1)
        return len(made)

    assert [derived_from(owner, "a", make), derived_from(owner, "a", make), derived_from(owner, "b", make)] == [1, 1, 2]
    entries = len(_derived)
    del owner
    assert len(_derived) == entries - 2
