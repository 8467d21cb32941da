"""Signed notes and note keys, checked against golang.org/x/mod/sumdb/note's vectors."""

from __future__ import annotations

import pytest

from bastion.audit._note import (
    NoteError,
    NoteSigner,
    NoteVerifier,
    generate_signing_key,
    open_note,
)

# From golang.org/x/mod/sumdb/note/note_test.go.
PETER_PRIVATE = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_PUBLIC = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_PUBLIC = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdng"
    "otpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWL"
    "ox33WWd1RvMc+QQ=\n"
)


@pytest.fixture
def peter() -> NoteVerifier:
    return NoteVerifier.from_text(PETER_PUBLIC)


@pytest.fixture
def enoch() -> NoteVerifier:
    return NoteVerifier.from_text(ENOCH_PUBLIC)


class TestKeys:
    def test_go_private_key_yields_go_public_key(self):
        """The Go test's private key parses and its public half is the Go test's verifier key."""
        signer = NoteSigner.from_private(PETER_PRIVATE)
        assert PETER_PUBLIC == signer.verifier().text()
        assert PETER_PRIVATE == signer.private_text()

    def test_key_id(self, peter):
        """A key is identified by its name and hash."""
        assert "PeterNeumann+c74f20a3" == peter.key_id
        assert bytes.fromhex("c74f20a3") == peter.key_hash

    @pytest.mark.parametrize("key", [PETER_PUBLIC, PETER_PRIVATE])
    def test_every_mangling_is_refused(self, key):
        """Every proper substring and every one-byte change of a key is refused (as Go's test)."""
        parse = NoteSigner.from_private if key.startswith("PRIVATE") else NoteVerifier.from_text
        manglings = {key[i:j] for i in range(len(key) + 1) for j in range(i + 1, len(key) + 1)}
        manglings |= {key[:i] + chr(ord(key[i]) + 1) + key[i + 1 :] for i in range(len(key))}
        manglings.discard(key)
        accepted = []
        for text in manglings:
            try:
                parse(text)
            except NoteError:
                continue
            accepted.append(text)
        assert [] == accepted

    @pytest.mark.parametrize(
        "key",
        [
            # From Go's test: a key of the wrong length, an unknown algorithm (hashes adjusted).
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ],
    )
    def test_bad_verifier_keys(self, key):
        """A key of the wrong length or an unknown algorithm is refused."""
        with pytest.raises(NoteError):
            NoteVerifier.from_text(key)

    def test_generated_key_round_trips(self):
        """A generated key's texts parse back to the same key, whose signatures verify."""
        private, public = generate_signing_key("audit.example.com")
        signer, verifier = NoteSigner.from_private(private), NoteVerifier.from_text(public)
        assert signer.verifier() == verifier
        assert ("hi\n", [verifier]) == open_note(signer.sign("hi\n"), [verifier])

    @pytest.mark.parametrize("name", ["", "a b", "a+b", "tab\there"])
    def test_invalid_names_are_refused(self, name):
        """A key name is non-empty, without spaces or plus signs."""
        with pytest.raises(NoteError):
            NoteSigner.generate(name)

    def test_repr_hides_the_seed(self):
        """The private seed never shows in a repr."""
        signer = NoteSigner.from_private(PETER_PRIVATE)
        assert signer.seed.hex() not in repr(signer)
        assert "seed" not in repr(signer)


class TestSign:
    def test_go_vector(self):
        """Signing the Go test's text gives the Go test's note byte for byte."""
        assert TEXT + "\n" + PETER_SIG == NoteSigner.from_private(PETER_PRIVATE).sign(TEXT)

    @pytest.mark.parametrize("body", ["abc", "", "a\n\n", "a\x01b\n", "a\rb\n"])
    def test_malformed_bodies_are_refused(self, body):
        """A body must end in one newline and hold no control characters but newlines."""
        with pytest.raises(NoteError):
            NoteSigner.from_private(PETER_PRIVATE).sign(body)


class TestOpen:
    def test_one_trusted_signature(self, peter):
        """A note verifies with one trusted key; an unknown key's signature is ignored."""
        assert (TEXT, [peter]) == open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [peter])

    def test_both_trusted(self, peter, enoch):
        """Every trusted key that signed is reported, in signature order."""
        assert (TEXT, [peter, enoch]) == open_note(
            TEXT + "\n" + PETER_SIG + ENOCH_SIG, [peter, enoch]
        )

    def test_no_trusted_signature(self):
        """A note signed by no trusted key is refused."""
        with pytest.raises(NoteError, match="no signature by a trusted key"):
            open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [])

    def test_duplicate_verifier_is_tolerated(self, peter):
        """The same key listed twice (signing and trusted keys overlap) is fine."""
        assert (TEXT, [peter]) == open_note(TEXT + "\n" + PETER_SIG + PETER_SIG, [peter, peter])

    def test_invalid_signature(self, peter):
        """A trusted key's signature that does not verify fails the whole note."""
        note = TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
        with pytest.raises(NoteError, match="invalid signature for note key PeterNeumann"):
            open_note(note, [peter])

    def test_changed_text(self, peter):
        """A change of the text makes the signature fail."""
        with pytest.raises(NoteError, match="invalid signature"):
            open_note(TEXT.replace("cryptography", "cryptograph") + "\n" + PETER_SIG, [peter])

    def test_too_many_signatures(self, peter):
        """More than 100 signature lines make the note malformed."""
        with pytest.raises(NoteError, match="more than 100"):
            open_note(TEXT + "\n" + PETER_SIG * 101, [peter])

    @pytest.mark.parametrize(
        "note",
        [
            TEXT,
            TEXT + "\n",
            TEXT + "\n" + PETER_SIG[:-1],
            "\x01" + TEXT + "\n" + PETER_SIG,
            TEXT + "\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1F",
            TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
            "\ud800" + TEXT + "\n" + PETER_SIG,
        ],
    )
    def test_malformed_notes(self, note, peter):
        """Go's malformed notes are refused (and a lone surrogate, Python's non-UTF-8)."""
        with pytest.raises(NoteError):
            open_note(note, [peter])
