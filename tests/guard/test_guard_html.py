"""HTML fields sanitised with nh3 against an allow-list, on input."""

import re

import pytest
from fastapi import FastAPI
from guard_support import install_bare
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from bastion.guard._html import SafeHtml, sanitize_html
from bastion.testing import lifespan_client

EVENT_ATTRIBUTE = re.compile(r"<[^>]*\son[a-z]+\s*=", re.IGNORECASE)

XSS = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    "<svg><script>alert(1)</script></svg>",
    '<a href="javascript:alert(1)">x</a>',
    '<a href="JaVaScRiPt:alert(1)">x</a>',
    '<a href="&#106;avascript:alert(1)">x</a>',
    '<a href="java\tscript:alert(1)">x</a>',
    '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    '<a href="vbscript:msgbox(1)">x</a>',
    '<p onclick="alert(1)">x</p>',
    '<p style="background:url(javascript:alert(1))">x</p>',
    '<iframe src="https://evil.example"></iframe>',
    '<object data="x.swf"></object>',
    '<embed src="x.swf">',
    '<form action="https://evil.example"><input name="p"></form>',
    "<style>body{display:none}</style>",
    '<meta http-equiv="refresh" content="0;url=https://evil.example">',
    '<base href="https://evil.example/">',
    '<link rel="stylesheet" href="https://evil.example/x.css">',
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
    "<<script>script>alert(1)<</script>/script>",
    "<!--<script>alert(1)</script>-->",
    '<a href="https://ok.example" onmouseover="alert(1)">x</a>',
    '<details open ontoggle="alert(1)">',
    '<video><source onerror="alert(1)"></video>',
    "<body onload=alert(1)>",
    '<div id="x" class="y" data-x="z">x</div>',
]


def assert_safe(html: str) -> None:
    """No script element, no event-handler attribute, no script URL survives."""
    lowered = html.lower()
    assert "<script" not in lowered
    assert EVENT_ATTRIBUTE.search(html) is None
    for scheme in ("javascript:", "vbscript:", "data:"):
        assert f'="{scheme}' not in lowered.replace(" ", "")
    for tag in ("<iframe", "<object", "<embed", "<form", "<style", "<meta", "<base", "<link"):
        assert tag not in lowered


class TestSanitizeHtml:
    @pytest.mark.parametrize("payload", XSS)
    def test_attacks_are_removed(self, payload):
        """Scripts, event handlers, script URLs, frames, forms and styles never survive."""
        clean = sanitize_html(payload)
        assert_safe(clean)
        assert clean == sanitize_html(clean)

    def test_allowed_markup_is_kept(self):
        """Text markup on the allow-list is kept as written."""
        html = (
            "<h2>Title</h2><p>Some <strong>bold</strong>, <em>em</em> and <code>x</code>.</p>"
            "<ul><li>one</li></ul><blockquote>q</blockquote><pre>a\n  b</pre>"
        )
        assert html == sanitize_html(html)

    def test_links_get_noopener_noreferrer(self):
        """Every kept link gets rel="noopener noreferrer", whatever rel it had."""
        clean = sanitize_html('<a href="https://example.com" rel="opener" target="_blank">x</a>')
        assert '<a href="https://example.com" rel="noopener noreferrer">x</a>' == clean

    def test_mailto_and_relative_links_are_kept(self):
        """mailto: and relative URLs pass the default scheme list."""
        assert 'href="mailto:a@example.com"' in sanitize_html('<a href="mailto:a@example.com">')
        assert 'href="/docs/1"' in sanitize_html('<a href="/docs/1">d</a>')

    def test_custom_allow_list(self):
        """A field can narrow the allow-list (here: only <b>)."""
        assert "<b>x</b>y" == sanitize_html("<b>x</b><i>y</i>", tags={"b"}, attributes={})

    def test_text_that_looks_like_markup_is_escaped(self):
        """Plain text with angle brackets is escaped, not dropped."""
        assert "a &lt; b &amp;&amp; c &gt; d" == sanitize_html("a < b && c > d")

    @given(
        st.lists(
            st.one_of(
                st.sampled_from(
                    [
                        "<script>",
                        "</script>",
                        "<p",
                        "<a href=",
                        '"javascript:alert(1)"',
                        " onclick=",
                        " onerror=x",
                        "<img src=x",
                        "<svg",
                        "<!--",
                        "-->",
                        ">",
                        "<",
                        "/",
                        '"',
                        "'",
                        "=",
                        "<b>",
                        "</b>",
                        "<style>",
                        "<iframe",
                        "&lt;",
                        "&#x3C;",
                        "<![CDATA[",
                        "<math>",
                        "<noscript>",
                        "<textarea>",
                        "<title>",
                        "\n",
                    ]
                ),
                st.text(max_size=5),
            ),
            max_size=25,
        ).map("".join)
    )
    def test_random_html_is_safe_and_stable(self, html):
        """For any HTML-ish input the output holds no script or on... attribute, and
        sanitising the output again changes nothing."""
        clean = sanitize_html(html)
        assert_safe(clean)
        assert clean == sanitize_html(clean)


class Comment(BaseModel):
    body: SafeHtml(60)


class TestSafeHtmlField:
    def test_model_holds_the_sanitised_value(self):
        """The model holds the sanitised HTML, not what the client sent."""
        comment = Comment(body='<p onclick="x()">Hi<script>alert(1)</script></p>')
        assert "<p>Hi</p>" == comment.body

    def test_invisible_and_control_characters(self):
        """HTML fields are cleaned like multiline text: bidi removed, NUL refused."""
        assert "<p>ab</p>" == Comment(body="<p>a\u202eb</p>").body
        with pytest.raises(ValidationError):
            Comment(body="<p>a\x00b</p>")

    def test_json_schema_states_bound_and_media_type(self):
        """The schema says it is HTML and how long it may be."""
        schema = TypeAdapter(SafeHtml(60)).json_schema()
        assert {"type": "string", "maxLength": 60, "contentMediaType": "text/html"} == schema

    async def test_too_long_after_sanitising_is_input_too_long(self):
        """Over HTTP, HTML longer than the bound once sanitised is INPUT_TOO_LONG with the
        limit; a long payload that sanitises to little is accepted."""
        app = FastAPI()

        @app.post("/comments")
        async def create(comment: Comment) -> dict:
            return comment.model_dump()

        install_bare(app)
        async with lifespan_client(app) as client:
            long_text = await client.post("/comments", json={"body": "<p>" + "x" * 60 + "</p>"})
            mostly_script = await client.post(
                "/comments", json={"body": "<script>" + "x" * 200 + "</script><b>ok</b>"}
            )
        assert (422, "INPUT_TOO_LONG") == (long_text.status_code, long_text.json()["code"])
        assert 60 == long_text.json()["errors"][0]["limit"]
        assert {"body": "<b>ok</b>"} == mostly_script.json()
