"""Serving requests without HTTP: OpenAI-shaped bodies -> library keyword arguments, the library's defaults per
task, batch keys, seeds, the chat conversation, and the refusals (all before anything is queued)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from bagel_rt import validate
from bagel_rt.errors import InputError
from bagel_rt.serve.requests import (
    MAX_INPUT_PIXELS,
    Limits,
    image_from_bytes,
    parse_chat,
    parse_edit,
    parse_generation,
)
from bagel_rt.tiny import TINY_PARAMS

LIMITS = Limits(TINY_PARAMS)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_defaults_are_the_librarys_per_task_and_keys_ignore_how_a_setting_was_given():
    t2i = dict(parse_generation({"prompt": "x"}, LIMITS).options)
    edit = dict(parse_edit({"prompt": "x", "image": png(40, 30)}, LIMITS).options)
    pick = ("cfg_img_scale", "cfg_interval", "cfg_renorm_type")
    assert [t2i[k] for k in pick] == [1.5, (0.4, 1.0), "global"]
    assert [edit[k] for k in pick] == [2.0, (0.0, 1.0), "text_channel"]
    assert t2i["num_timesteps"] == edit["num_timesteps"] == 50 and not t2i["think"]
    assert not t2i["enable_taylorseer"]
    implicit = parse_generation({"prompt": "a", "size": "64x32"}, LIMITS)
    explicit = parse_generation({"prompt": "b", "size": "64x32", "cfg_text_scale": 4, "cfg_interval": [0.4, 1],
                                 "num_timesteps": 50}, LIMITS)
    assert implicit.key == explicit.key and implicit.size == (32, 64)
    assert parse_generation({"prompt": "a", "cfg_text_scale": 5}, LIMITS).key != implicit.key


def test_seeds_count_up_from_the_given_one_and_are_drawn_otherwise():
    assert parse_generation({"prompt": "x", "n": 3, "seed": 10}, LIMITS).seeds == (10, 11, 12)
    drawn = parse_generation({"prompt": "x", "n": 4}, LIMITS).seeds
    assert len(drawn) == 4 and all(isinstance(s, int) and s >= 0 for s in drawn)
    with pytest.raises(InputError, match="exceeds the largest seed"):
        parse_generation({"prompt": "x", "n": 2, "seed": validate.MAX_SEED}, LIMITS)
    with pytest.raises(InputError, match="seed must be an integer"):
        parse_generation({"prompt": "x", "seed": 1.5}, LIMITS)


def test_edit_size_is_the_resized_input_and_other_sizes_are_refused():
    req = parse_edit({"prompt": "x", "image": png(40, 30), "size": "auto"}, LIMITS)
    assert req.size == (512, 688) and req.image.size == (40, 30)  # the official resize: short side 512
    with pytest.raises(InputError, match='here "688x512"'):
        parse_edit({"prompt": "x", "image": png(40, 30), "size": "64x64"}, LIMITS)
    with pytest.raises(InputError, match="mask is not supported"):
        parse_edit({"prompt": "x", "image": png(40, 30), "mask": png(40, 30)}, LIMITS)


def test_images_are_checked_before_their_pixels_are_decoded():
    huge = io.BytesIO()
    Image.new("1", (9000, 8000)).save(huge, format="PNG")  # small file, 72 megapixels
    with pytest.raises(InputError, match=f"at most {MAX_INPUT_PIXELS} pixels"):
        image_from_bytes(huge.getvalue(), "image")
    with pytest.raises(InputError, match="is not an image"):
        image_from_bytes(b"GIF89a" + b"\0" * 3, "image")
    with pytest.raises(InputError, match="cannot be decoded"):
        image_from_bytes(png(64, 64)[:-40], "image")


def test_chat_conversation_becomes_interleaved_inputs_in_order():
    url = "data:image/png;base64," + base64.b64encode(png(28, 28)).decode()
    req = parse_chat({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "a square"},
        {"role": "user", "content": "which color?"}]}, LIMITS)
    kinds = [type(x).__name__ if not isinstance(x, str) else x for x in req.inputs]
    assert kinds[0] == "be brief" and kinds[1] != "what is it?" and kinds[2:] == ["what is it?", "a square",
                                                                                  "which color?"]
    assert (req.do_sample, req.text_temperature, req.max_think_token_n, req.think) == (False, 0.3, 512, False)
    sampled = parse_chat({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}, LIMITS)
    assert (sampled.do_sample, sampled.text_temperature) == (True, 0.7)
    greedy = parse_chat({"messages": [{"role": "user", "content": "hi"}], "temperature": 0}, LIMITS)
    assert not greedy.do_sample
    with pytest.raises(InputError, match="last message must be the user's"):
        parse_chat({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                   LIMITS)
    with pytest.raises(InputError, match="expected a text part, got 'image_url'"):
        parse_chat({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": url}]},
                                 {"role": "user", "content": "hi"}]}, LIMITS)
    with pytest.raises(InputError, match="give one token limit"):
        parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 5},
                   LIMITS)
