"""The batch's progress line: which node runs, its step, the photo's clocks."""
from __future__ import annotations

from diffpriv_client.progress import ProgressBoard, clock_text, stage_title

GRAPH = {"5": {"class_type": "DiffPrivacyMSIInversion"}, "3": {"class_type": "LoadImage", "_meta": {"title": "Face photo"}},
         "9": {"class_type": "VAEEncode"}}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stages_are_named_for_people():
    assert stage_title(GRAPH, "5") == "MSI Inversion"
    assert stage_title(GRAPH, "3") == "Face photo"
    assert stage_title(GRAPH, "9") == "VAE Encode"
    assert stage_title(GRAPH, "77") == "node 77"
    assert clock_text(5) == "00:05" and clock_text(3725) == "1:02:05"


def test_elapsed_time_moves_between_events_and_the_stage_estimates_what_is_left():
    clock = Clock()
    board = ProgressBoard(clock)
    board.stage("astronaut", "MSI Inversion")
    clock.now += 250  # a long first step: no event, but the clock moves
    assert board.line() == "astronaut: MSI Inversion, 04:10 elapsed"
    board.step("astronaut", 10, 100)
    clock.now += 5
    assert board.line() == "astronaut: MSI Inversion 10/100, 04:15 elapsed, stage ~37:25 left"
    board.stage("astronaut", "Guided DDIM Sampler")  # the counter restarts, under the new stage's name
    board.step("astronaut", 1, 30)
    assert board.line().startswith("astronaut: Guided DDIM Sampler 1/30, 04:15 elapsed")


def test_a_finished_photo_leaves_the_line_and_times_the_next():
    clock = Clock()
    board = ProgressBoard(clock)
    board.stage("a", "MSI Inversion")
    board.stage("b", "MSI Inversion")
    clock.now += 60
    board.finished("a")
    assert board.line() == "b: MSI Inversion, 01:00 elapsed, photo ~00:00 left"
    board.forget("b")  # requeued after its server died: not a photo's duration
    board.stage("c", "VAE Encode")
    clock.now += 20
    assert board.line() == "c: VAE Encode, 00:20 elapsed, photo ~00:40 left" and board.durations == [60.0]
    board.finished("c")
    assert board.line() == ""
