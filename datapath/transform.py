"""ESP transforms: how one SA turns a payload into an ESP packet and back.

A transform object is built once per SA, with its key objects (AEAD context,
HMAC template, persistent CBC contexts) made in the constructor, so the
per-packet path only packs, joins and calls into the crypto library. The CBC
contexts carry state from packet to packet: use a transform from one thread.

Packet layout (RFC 4303 §2), offsets from the start of the ESP header:

    0  SPI (4) | 4  sequence number, low 32 bits (4) | 8  IV (iv_size)
    then ciphertext of  payload | padding 1,2,3.. | pad length | next header
    then ICV (icv_size)

Where the high 32 bits of an extended sequence number (ESN) go differs
(RFC 4303 §2.2.1, App. A): AEAD transforms put them in the middle of the
associated data, SPI | seq_hi | seq_lo (RFC 4106 §5, RFC 7634 §2.1); HMAC
transforms append them after the ciphertext for the ICV computation only.

`seal()` returns the whole ESP packet; `open()` returns the decrypted
payload with its trailer still attached, None when the ICV does not verify,
or MALFORMED (empty) when a block cipher's ciphertext is not a whole number
of blocks. The minimum length is checked by the caller (`min_packet_size`);
the trailer is checked by the SA, the same way for every transform.
"""

from __future__ import annotations

import hmac
import math
import os
import struct
from collections.abc import Callable
from typing import ClassVar

from Crypto.Cipher import DES3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from datapath.errors import EspConfigError

ESP_HEADER_SIZE = 8  # SPI + low 32 bits of the sequence number
ESP_TRAILER_SIZE = 2  # pad length + next header
SEQ_LO_MASK = 0xFFFF_FFFF
AEAD_SALT_SIZE = 4  # RFC 4106 §8.1, RFC 7634 §2: KEYMAT = key | salt
ICV_ALIGNMENT = 4  # RFC 4303 §2.4: the ICV starts on a 32-bit boundary
MAX_PAD_LENGTH = 255

# open() result for a packet that cannot be this transform's (never a
# plaintext: every plaintext holds at least the 2-byte trailer)
MALFORMED = b""

# The default padding content, 1, 2, 3, ... (RFC 4303 §2.4).
PADDING = bytes(range(1, MAX_PAD_LENGTH + 1))

_HEADER = struct.Struct(">II")  # SPI, seq_lo
_HEADER_IV64 = struct.Struct(">IIQ")  # SPI, seq_lo, 64-bit IV
_ESN_AAD = struct.Struct(">III")  # SPI, seq_hi, seq_lo (RFC 4106 §5)
_SEQ_HI = struct.Struct(">I")
_NONCE = struct.Struct(">4sQ")  # salt, IV (RFC 4106 §4)


def _build_trailers(max_pad: int) -> tuple[bytes, ...]:
    """Padding | pad length | next header for every (pad length, next header).

    Indexed by `pad_length << 8 | next_header`, so sealing a packet needs no
    per-packet construction of the trailer.
    """
    return tuple(
        PADDING[:pad] + bytes((pad, nh))
        for pad in range(max_pad + 1)
        for nh in range(256)
    )


# Pad lengths up to 15 cover every transform here (largest alignment: 16).
_TRAILERS = _build_trailers(15)


class Transform:
    """Base of the transforms: sizes, and the interface the SA calls."""

    name: ClassVar[str]
    iv_size: ClassVar[int]
    icv_size: ClassVar[int]
    block_size: ClassVar[int]  # cipher block size, 1 for stream/AEAD modes

    def __init__(self, spi: int, esn: bool) -> None:
        self.spi = spi
        self.esn = esn
        # the encrypted part ends on a multiple of this (RFC 4303 §2.4)
        self.alignment = math.lcm(self.block_size, ICV_ALIGNMENT)

    @property
    def min_packet_size(self) -> int:
        """The shortest ESP packet that can carry a trailer."""
        encrypted = max(ESP_TRAILER_SIZE, self.block_size)
        return ESP_HEADER_SIZE + self.iv_size + encrypted + self.icv_size

    def pad_length(self, payload_len: int) -> int:
        return -(payload_len + ESP_TRAILER_SIZE) % self.alignment

    def overhead(self, payload_len: int) -> int:
        """Bytes that `seal()` adds to a payload of this length."""
        fixed = ESP_HEADER_SIZE + self.iv_size + ESP_TRAILER_SIZE + self.icv_size
        return fixed + self.pad_length(payload_len)

    def max_payload(self, esp_space: int) -> int:
        """The largest payload whose ESP packet fits in `esp_space` bytes."""
        encrypted = esp_space - ESP_HEADER_SIZE - self.iv_size - self.icv_size
        encrypted -= encrypted % self.alignment
        return max(encrypted - ESP_TRAILER_SIZE, 0)

    @classmethod
    def key_lengths(cls) -> tuple[tuple[int, ...], int]:
        """Accepted `key` lengths, and the `auth_key` length (0: none)."""
        raise NotImplementedError

    def seal(self, seq: int, payload: bytes, next_header: int) -> bytes:
        raise NotImplementedError

    def open(self, packet: bytes, seq: int) -> bytes | None:
        raise NotImplementedError


class AeadTransform(Transform):
    """AEAD ESP with an 8-byte IV equal to the 64-bit sequence number.

    The IV only has to be unique per key (RFC 4106 §3.1, RFC 7634 §2); the
    sequence number never repeats on an SA (the sender refuses to wrap), so
    nonces never repeat either.
    """

    iv_size = 8
    icv_size = 16
    block_size = 1
    key_sizes: ClassVar[tuple[int, ...]]
    aead_class: ClassVar[type[AESGCM] | type[ChaCha20Poly1305]]

    @classmethod
    def key_lengths(cls) -> tuple[tuple[int, ...], int]:
        return tuple(n + AEAD_SALT_SIZE for n in cls.key_sizes), 0

    def __init__(self, spi: int, esn: bool, key: bytes, auth_key: bytes) -> None:
        super().__init__(spi, esn)
        cipher_key_size = len(key) - AEAD_SALT_SIZE
        if cipher_key_size not in self.key_sizes:
            sizes = "/".join(str(n + AEAD_SALT_SIZE) for n in self.key_sizes)
            raise EspConfigError(
                f"{self.name}: key must be {sizes} bytes (key | 4-byte salt), "
                f"got {len(key)}"
            )
        if auth_key:
            raise EspConfigError(f"{self.name}: takes no separate auth key")
        aead = self.aead_class(key[:cipher_key_size])
        self._encrypt = aead.encrypt
        self._decrypt = aead.decrypt
        self._salt = key[cipher_key_size:]
        self._ct_offset = ESP_HEADER_SIZE + self.iv_size

    def seal(self, seq: int, payload: bytes, next_header: int) -> bytes:
        seq_lo = seq & SEQ_LO_MASK
        header = _HEADER_IV64.pack(self.spi, seq_lo, seq)
        if self.esn:
            aad = _ESN_AAD.pack(self.spi, seq >> 32, seq_lo)
        else:
            aad = header[:ESP_HEADER_SIZE]
        pad = -(len(payload) + ESP_TRAILER_SIZE) & (ICV_ALIGNMENT - 1)
        plaintext = payload + _TRAILERS[pad << 8 | next_header]
        return header + self._encrypt(_NONCE.pack(self._salt, seq), plaintext, aad)

    def open(self, packet: bytes, seq: int) -> bytes | None:
        if self.esn:
            aad = _ESN_AAD.pack(self.spi, seq >> 32, seq & SEQ_LO_MASK)
        else:
            aad = packet[:ESP_HEADER_SIZE]
        nonce = self._salt + packet[ESP_HEADER_SIZE : self._ct_offset]
        try:
            return self._decrypt(nonce, packet[self._ct_offset :], aad)
        except InvalidTag:
            return None


class AesGcm128(AeadTransform):
    """AES-GCM with a 16-byte ICV (RFC 4106), 128-bit key."""

    name = "aes-gcm-128"
    key_sizes = (16,)
    aead_class = AESGCM


class AesGcm256(AeadTransform):
    """AES-GCM with a 16-byte ICV (RFC 4106), 256-bit key."""

    name = "aes-gcm-256"
    key_sizes = (32,)
    aead_class = AESGCM


class ChaCha20Poly1305Transform(AeadTransform):
    """ChaCha20-Poly1305 for ESP (RFC 7634)."""

    name = "chacha20-poly1305"
    key_sizes = (32,)
    aead_class = ChaCha20Poly1305


class CbcHmacTransform(Transform):
    """A CBC cipher with a random IV, then a truncated HMAC (encrypt-then-MAC).

    ICV input: SPI | seq_lo | IV | ciphertext (| seq_hi with ESN), RFC 4303
    §2.2.1 and §3.3.4. On receive the ICV is verified, in constant time,
    before anything is decrypted (§3.4.4.1).

    CBC contexts are made once per SA and kept: each packet is fed as
    `R | plaintext` through the running chain with a fresh random block R.
    The ciphertext of R is then a random block, and the rest is exactly the
    CBC encryption of the plaintext with that block as IV, so we send it as
    the IV (RFC 3602 §2.3 asks for an unpredictable IV, which it is: it is
    the encryption of a random block). Decryption feeds `IV | ciphertext`
    and discards the first output block, which depends on the previous
    packet only.
    """

    auth_key_size: ClassVar[int]
    key_sizes: ClassVar[tuple[int, ...]]
    hash_class: ClassVar[type[hashes.HashAlgorithm]]

    @classmethod
    def key_lengths(cls) -> tuple[tuple[int, ...], int]:
        return cls.key_sizes, cls.auth_key_size

    def __init__(self, spi: int, esn: bool, key: bytes, auth_key: bytes) -> None:
        super().__init__(spi, esn)
        if len(key) not in self.key_sizes:
            sizes = "/".join(str(n) for n in self.key_sizes)
            raise EspConfigError(
                f"{self.name}: key must be {sizes} bytes, got {len(key)}"
            )
        if len(auth_key) != self.auth_key_size:
            raise EspConfigError(
                f"{self.name}: auth_key must be {self.auth_key_size} bytes, "
                f"got {len(auth_key)}"
            )
        self._hmac = crypto_hmac.HMAC(auth_key, self.hash_class())
        self._encrypt, self._decrypt = self._make_cbc(key)
        self._ct_offset = ESP_HEADER_SIZE + self.iv_size

    def _make_cbc(
        self, key: bytes
    ) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        raise NotImplementedError

    def _icv(self, signed: bytes, seq: int) -> bytes:
        mac = self._hmac.copy()
        mac.update(signed)
        if self.esn:
            mac.update(_SEQ_HI.pack(seq >> 32))
        return mac.finalize()[: self.icv_size]

    def seal(self, seq: int, payload: bytes, next_header: int) -> bytes:
        pad = self.pad_length(len(payload))
        plaintext = payload + _TRAILERS[pad << 8 | next_header]
        # the random block's ciphertext is the IV (see class docstring)
        iv_and_ciphertext = self._encrypt(os.urandom(self.iv_size) + plaintext)
        signed = _HEADER.pack(self.spi, seq & SEQ_LO_MASK) + iv_and_ciphertext
        return signed + self._icv(signed, seq)

    def open(self, packet: bytes, seq: int) -> bytes | None:
        icv_start = len(packet) - self.icv_size
        if (icv_start - self._ct_offset) % self.block_size:
            # the SA checks this first; the running CBC context must never
            # be left holding a partial block
            return MALFORMED
        signed = packet[:icv_start]
        if not hmac.compare_digest(self._icv(signed, seq), packet[icv_start:]):
            return None
        return self._decrypt(signed[ESP_HEADER_SIZE:])[self.iv_size :]


class AesCbcHmacSha256(CbcHmacTransform):
    """AES-CBC (RFC 3602) with HMAC-SHA-256-128 (RFC 4868)."""

    name = "aes-cbc-hmac-sha256"
    iv_size = 16
    icv_size = 16
    block_size = 16
    key_sizes = (16, 24, 32)
    auth_key_size = 32
    hash_class = hashes.SHA256

    def _make_cbc(
        self, key: bytes
    ) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        zero_iv = bytes(self.iv_size)
        cipher = Cipher(algorithms.AES(key), modes.CBC(zero_iv))
        return cipher.encryptor().update, cipher.decryptor().update


class TripleDesCbcHmacSha1(CbcHmacTransform):
    """Legacy 3DES-CBC (RFC 2451) with HMAC-SHA1-96 (RFC 2404)."""

    name = "3des-cbc-hmac-sha1"
    iv_size = 8
    icv_size = 12
    block_size = 8
    key_sizes = (24,)
    auth_key_size = 20
    hash_class = hashes.SHA1

    def _make_cbc(
        self, key: bytes
    ) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
        zero_iv = bytes(self.iv_size)
        try:
            encryptor = DES3.new(key, DES3.MODE_CBC, iv=zero_iv)
            decryptor = DES3.new(key, DES3.MODE_CBC, iv=zero_iv)
        except ValueError as exc:  # e.g. a key that degenerates to single DES
            raise EspConfigError(f"{self.name}: {exc}") from None
        return encryptor.encrypt, decryptor.decrypt


TRANSFORMS: dict[str, type[AeadTransform] | type[CbcHmacTransform]] = {
    cls.name: cls
    for cls in (
        AesGcm128,
        AesGcm256,
        ChaCha20Poly1305Transform,
        AesCbcHmacSha256,
        TripleDesCbcHmacSha1,
    )
}


def make_transform(
    name: str, spi: int, key: bytes, auth_key: bytes = b"", esn: bool = True
) -> Transform:
    """The transform called `name`, keyed; EspConfigError on bad key material."""
    try:
        cls = TRANSFORMS[name]
    except KeyError:
        known = ", ".join(sorted(TRANSFORMS))
        raise EspConfigError(f"unknown transform {name!r} (known: {known})") from None
    return cls(spi, esn, key, auth_key)
