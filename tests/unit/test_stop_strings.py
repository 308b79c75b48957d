from services.router.stops import StopStringMatcher


def feed(stops, deltas):
    matcher = StopStringMatcher(stops)
    out = []
    for delta in deltas:
        out.append(matcher.push(delta))
        if matcher.stopped:
            break
    else:
        out.append(matcher.flush())
    return "".join(out), matcher.stopped, out


def test_a_stop_string_split_across_deltas_is_found_and_not_sent():
    text, stopped, pieces = feed(["END"], ["The st", "ory E", "N", "D and more"])
    assert stopped and text == "The story "
    assert "E" not in "".join(pieces)  # the E was held back, never sent


def test_text_that_only_looked_like_a_stop_start_is_released():
    text, stopped, _ = feed(["END"], ["an E", "lephant"])
    assert not stopped and text == "an Elephant"


def test_the_earliest_of_several_stops_wins_and_no_stops_pass_through():
    assert feed(["\n\n", "Paris"], ["It is Paris.\n\nYes"])[0] == "It is "
    assert feed([], ["a", "b"])[0] == "ab"
