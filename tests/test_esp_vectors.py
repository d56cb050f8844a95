"""Published ESP test vectors, each with an altered twin that must be rejected.

Sources (the hex below was checked by running these tests: a wrong byte
anywhere in a ciphertext fails its ICV):

- draft-mcgrew-gcm-test-01 §4, "Test Cases for the use of GCM and GMAC in
  IPsec ESP": complete RFC 4106 packets, https://datatracker.ietf.org/doc/
  html/draft-mcgrew-gcm-test-01. The nonce printed there is salt | IV, so
  the salt is its first 4 bytes. Cases with a 192-bit key (we offer 128 and
  256) or SPI 0 (never valid on the wire) are left out. Most of these
  plaintexts carry next header 1, which tunnel mode refuses after the ICV
  passed, so they check the AEAD layout (AAD, nonce, ESN) byte for byte and
  then expect Drop.BAD_NEXT_HEADER.
- RFC 7634 Appendix A, the ChaCha20-Poly1305 ESP example,
  https://www.rfc-editor.org/rfc/rfc7634#appendix-A.
- RFC 3602 §4 cases 5 (transport) and 7 (tunnel), AES-CBC ESP packets
  without integrity, https://www.rfc-editor.org/rfc/rfc3602#section-4; an
  HMAC-SHA-256-128 ICV is appended here with the standard library's hmac.
- Linux-generated packets from scapy's test suite (test/scapy/layers/
  ipsec.uts), with the `ip xfrm state` command that made each; those made
  without integrity also get an ICV appended here with `hmac`.
- scapy's AES-CBC + HMAC-SHA-256-128 known-answer packet with ESN high 68.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import pytest

from datapath.esp import (
    NEXT_HEADER_IPV4,
    Drop,
    InboundSA,
    Opened,
    SAConfig,
)


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


@dataclass(frozen=True)
class Vector:
    name: str
    transform: str
    key: str  # hex; AEAD: key | salt
    spi: int
    seq: int  # the full sequence number the packet was sealed with
    esn: bool
    packet: str  # hex, SPI through ICV
    plaintext: str  # hex, the decrypted payload with its ESP trailer
    auth_key: str = ""
    expected: str = "open"  # "open", or the Drop value expected after the ICV


def hmac_icv(digest: str, auth_key: str, signed: bytes, size: int) -> bytes:
    """An ICV computed independently of the code under test (RFC 4868, 2404)."""
    return hmac.new(unhex(auth_key), signed, getattr(hashlib, digest)).digest()[:size]


# --- draft-mcgrew-gcm-test-01 §4 --------------------------------------------

GCM_DRAFT = [
    Vector(
        "gcm-draft-esn-4321",
        "aes-gcm-128",
        "4c80cdefbb5d10da906ac73c3613a634 2e443b68",
        0x4321,
        0x87654321_00000000,
        True,
        """00004321000000004956ed7e3b244cfe
           fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34
           cfa2436f14a3f3cf65925bf1f4a13c5d15b21e1884f5ff6247aeabb786b93bce
           61bc17d768fd9732459018148f6cbe722fd04796562dfdb4""",
        """45000048699a000080114db7c0a80102c0a801010a9bf15638d3010000010000
           00000000045f736970045f7564700373697009637962657263697479
           02646b000021000101020201""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-a5f8",
        "aes-gcm-128",
        "feffe9928665731c6d6a8f9467308308 cafebabe",
        0xA5F8,
        0x0A,
        False,
        """0000a5f80000000afacedbaddecaf888
           deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c
           3de81827c10e9a4f51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd1
           83b70d3aa8bc6ee4c309e9d85a41ad4a""",
        """4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d00100
           0001000000000000037369700963796265726369747902646b00000100010001""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-256-4a2cbfe3",
        "aes-gcm-256",
        """abbccddef00112233445566778899aababbccddef00112233445566778899aab
           11223344""",
        0x4A2CBFE3,
        2,
        False,
        """4a2cbfe3000000020102030405060708
           ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763
           748a637985771d347f0545659f14e99def842d8eb335f4eecfdbf831824b4c49
           15956c96""",
        """4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee000000000
           7002400020bf0000020405b40101040201020201""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-esn-42f67e3f-ping",
        "aes-gcm-128",
        "3de09874b388e6491988d0c3607eae1f 57690e43",
        0x42F67E3F,
        0x10101010_10101010,
        True,
        """42f67e3f101010104e280000a2fca1a3
           fba2caa4853cf9f0f22cb10d86dd83b0fec75691cf1a04b00d1138ec9c357917
           65acbd8701ad79845bf9fe3fba487bc91755e6662b4c8d0d1f5e22739530320a
           e0d731cc978ecafaeae88f00e80d6e48""",
        """4500003c99c300008001cb7c40679318010101010800085c0200430061626364
           65666768696a6b6c6d6e6f7071727374757677616263646566676869
           01020201""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-esn-42f67e3f-short",
        "aes-gcm-128",
        "3de09874b388e6491988d0c3607eae1f 57690e43",
        0x42F67E3F,
        0x10101010_10101010,
        True,
        """42f67e3f101010104e280000a2fca1a3
           fba2ca845e5df9f0f22c3e6e86dd831e1fc65792cd1af9130e1379ed369f071f
           35e034be95f112e4e7d05d35""",
        "4500001c42a200008001441f406793b6e00000020a00f5ff01020201",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-esn-100",
        "aes-gcm-128",
        "abbccddef00112233445566778899aab decaf888",
        0x100,
        1,
        True,
        """0000010000000001cafedebaceface74
           18a6fd42f72cbf4ab2a2ea901f73d814e3e7f243d95412e1c349c1d2fbec168f
           9190feebaf2cb01984e65863965d7472b79da345e0e780191f0d2f0e0f496c22
           6f2127b27db35724e7845d68651f57e65f354f75ff17015769623436""",
        """4500004933ba00007f119106c3fb1d10c2b1d326c02831ce0035dd7b800302d5
           00004e20001e8c18d75b81dc91baa0476b91b924b280389d92c963bac046ec95
           9b6266c04722b14923010101""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-256-esn-17405e67",
        "aes-gcm-256",
        """abbccddef00112233445566778899aababbccddef00112233445566778899aab
           73616c74""",
        0x17405E67,
        0x156F3126_DD0DB99B,
        True,
        """17405e67dd0db99b616e640169766563
           f2d69ecdbd5a0d5b8d5ef38bad4da58d1f278fde98ef67549d524a3018d9a57f
           f4d3a31ce673119e451626c2415771e3b7eebca614c89b35""",
        """45080028732c00004006e9f90a0106120a01038f06b88023dd6bafbecb712602
           50101f646d540001""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-esn-42f67e3f-dns",
        "aes-gcm-128",
        "3de09874b388e6491988d0c3607eae1f 57690e43",
        0x42F67E3F,
        0x10101010_10101010,
        True,
        """42f67e3f101010104e280000a2fca1a3
           fba2cad12fc1f9f00d3cebf305410db83d7784b607323d220f24b0a97d541828
           00cadb0f68d99ef0e0c0c89ae9bea8884e52d65bc1afd0740f742444747b5b39
           ab533163aad4550ee5160975cdb608c5769189609763b8e18caa81e2""",
        """45000049333e00007f119182c3fb1d10c2b1d326c02831ce0035cb458003025b
           000001e0001e8c18d65759d52284a0352c71475c8880391c764d6e5ee0496b32
           5ae270c03899493915010101""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-256-esn-17405e67-text",
        "aes-gcm-256",
        """abbccddef00112233445566778899aababbccddef00112233445566778899aab
           73616c74""",
        0x17405E67,
        0x156F3126_DD0DB99B,
        True,
        """17405e67dd0db99b616e640169766563
           d4b7ed86a1777f2ea13d6973d324c69e7b43f826fb56831226508bebd2dceb18
           d0a6df10e5487df074113e14c641024e3e6773d91a62ee429b043a10e3efe6b0
           12a49363412364f8c0cac587f249e56b11e24f30e44ccc76""",
        """636973636f0172756c65730174686501
           6e6574776501646566696e6501746865746563686e6f6c6f6769657301746861
           7477696c6c01646566696e65746f6d6f72726f7701020201""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-335467ae-empty",
        "aes-gcm-128",
        "7d773d00c144c525ac619d18c84a3f47 d9664267",
        0x335467AE,
        0xFFFFFFFF,
        False,
        """335467aeffffffff43457e9182443bc6
           437f866bcb3f699fe9b0822bac961c4504bef270""",
        "01020201",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-esn-100-text",
        "aes-gcm-128",
        "abbccddef00112233445566778899aab decaf888",
        0x100,
        1,
        True,
        """0000010000000001cafedebaceface74
           29c9fc69a197d038ccdd14e2ddfcaa0543332164412503524303ed3c6c5f2838
           43af8c3e""",
        "746f016265016f72016e6f7401746f0162650001",
        expected=Drop.BAD_NEXT_HEADER,
    ),
    Vector(
        "gcm-draft-256-esn-last",
        "aes-gcm-256",
        """6c6567616c697a656d6172696a75616e61616e64646f69746265666f72656961
           7475726e""",
        0x796B6963,
        0xFFFFFFFF_FFFFFFFF,
        True,
        """796b6963ffffffff333021696765746d
           f97ab2aa356d8edce17644ac8c78e25dd24dedbb29ebf1b64a274b39b49c3a86
           4cd3d78ca4ae68a32b42458fb57dbe821dcc63b9d0937ba2945f669368661a32
           9fb4c053""",
        """45000030da3a00008001df3bc0a80005c0a800010800c6cd0200070061626364
           65666768696a6b6c6d6e6f707172737401020201""",
        expected=Drop.BAD_NEXT_HEADER,
    ),
]

# --- RFC 7634 Appendix A ----------------------------------------------------

RFC7634 = Vector(
    "rfc7634-appendix-a",
    "chacha20-poly1305",
    """808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f
       a0a1a2a3""",
    0x01020304,
    5,
    False,
    """0102030400000005 1011121314151617
       24039428b97f417e3c13753a4f05087b67c352e6a7fab1b982d466ef407ae5c6
       14ee8099d52844eb61aa95dfab4c02f72aa71e7c4c4f64c9befe2facc638e8f3
       cbec163fac469b502773f6fb94e664da9165b82829f641e0
       76aaa8266b7fb0f7b11b369907e1ad43""",
    """45000054a6f200004001e778c6336405c000020508005b7a3a080000553bec10
       00073627080 90a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223
       2425262728292a2b2c2d2e2f3031323334353637 01020204""",
)

# --- RFC 3602 §4 cases 5 and 7, plus an appended HMAC-SHA-256-128 ICV -------

RFC3602_AUTH_KEY = "00" * 16 + "ff" * 16  # ours: RFC 3602 has no integrity


def with_icv(vector: Vector, digest: str, icv_size: int, esn_high: int = 0) -> Vector:
    """`vector` with an ICV appended, computed with the standard library."""
    signed = unhex(vector.packet)
    extra = esn_high.to_bytes(4, "big") if vector.esn else b""
    icv = hmac_icv(digest, vector.auth_key, signed + extra, icv_size)
    return Vector(**{**vector.__dict__, "packet": vector.packet + icv.hex()})


RFC3602 = [
    with_icv(
        Vector(
            "rfc3602-case5-transport",
            "aes-cbc-hmac-sha256",
            "90d382b410eeba7ad938c46cec1a82bf",
            0x4321,
            1,
            False,
            """0000432100000001 e96e8c08ab465763fd098d45dd3ff893
               f663c25d325c18c6a9453e194e120849a4870b66cc6b9965330013b4898dc856
               a4699e523a55db080b59ec3a8e4b7e52775b07d1db34ed9c538ab50c551b874a
               a269add047ad2d5913ac19b7cfbad4a6""",
            """08000ebda70a00008e9c083db95b070008090a0b0c0d0e0f1011121314151617
               18191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637
               0102030405060708090a0b0c0d0e0e01""",
            auth_key=RFC3602_AUTH_KEY,
            expected=Drop.BAD_NEXT_HEADER,  # transport mode: next header 1
        ),
        "sha256",
        16,
    ),
    with_icv(
        Vector(
            "rfc3602-case7-tunnel",
            "aes-cbc-hmac-sha256",
            "0123456789abcdef0123456789abcdef",
            0x8765,
            2,
            False,
            """0000876500000002 f4e765244f6407adf13dc1380f673f37
               773b5241a4c449225e4f3ce5ed611b0c237ca96cf74a93013c1b0ea1a0cf70f8
               e4ecaec78ac53aad7a0f022b859243c647752e94a859352b8a4d4d2decd136e5
               c177f132ad3fbfb2201ac9904c74ee0a109e0ca1e4dfe9d5a100b842f1c22f0d""",
            """4500005409040000 4001f988c0a87b03c0a87bc808009f76a90a0100b49c083d
               02a2040008090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223
               2425262728292a2b2c2d2e2f3031323334353637
               0102030405060708090a0a04""",
            auth_key=RFC3602_AUTH_KEY,
        ),
        "sha256",
        16,
    ),
]

# --- Linux-generated packets (scapy test/scapy/layers/ipsec.uts) ------------

# All are tunnel-mode echo requests from Linux 4.4.0-62-generic, SPI 0x222,
# sequence number 1, inner ICMP; padding 01 02 where the cipher needs it.
LINUX_INNER_PREFIX = "4500"  # an IPv4 header: the full inner packet is checked

LINUX = [
    # ip xfrm state add src 10.125.0.2 dst 10.125.0.1 proto esp spi 546 reqid 1 \
    #    mode tunnel aead 'rfc4106(gcm(aes))' \
    #    '0x3136627974656b65792b34627974656e6f6e6365' 128 flag align4
    Vector(
        "linux-rfc4106-gcm",
        "aes-gcm-128",
        b"16bytekey+4bytenonce".hex(),
        0x222,
        1,
        False,
        """0000022200000001
           66002886e9dfc524b0bdfd62617ed3767b48288e76aaea48b840308ace5071bb
           c0b24771d7a4a0cb0368d3165a7c378487c71959b47c76e348c0904bd23695c1
           b7a4b67b89e64f10aedb84474600b444e66d16555f8236a549f7528165904d28
           92b2e3f1a402d237ac0b7a10cf6446b9""",
        "",  # filled in by test_linux_inner_is_an_echo_request
    ),
    # the same state with ESN, sending with the high half 1 (scapy's test
    # decrypts it with esn_en=True, esn=1)
    Vector(
        "linux-rfc4106-gcm-esn",
        "aes-gcm-128",
        b"16bytekey+4bytenonce".hex(),
        0x222,
        (1 << 32) + 1,
        True,
        """0000022200000001
           66002886e9dfc524b0bdfd62617ed3767b48288e76aaea48b840308ace5071bb
           c0b24771d7a4a0cb0368d3165a7c378487c71959b47c76e348c0904bd23695c1
           b7a4b67b89e64f10aedb84474600b444e66d16555f8236a549f7528165904d28
           fe4d22836a810d6094db45220392f694""",
        "",
    ),
    # ip xfrm state add src 10.125.0.2 dst 10.125.0.1 proto esp spi 546 reqid 1 \
    #   mode tunnel enc 'cbc(aes)' '0x7369787465656e6279746573206b6579' \
    #   auth digest_null '' flag align4
    with_icv(
        Vector(
            "linux-cbc-aes",
            "aes-cbc-hmac-sha256",
            b"sixteenbytes key".hex(),
            0x222,
            1,
            False,
            """0000022200000001
               082f94e653d88e1370e8ff615290273cf2b41f75d2a0acae1ca85e1c78214c7f
               c330176a8df3b1a7d1a84201d68d2d7e5d06dfaa052742b10012cfff64025a40
               cdca1b91baf8c859e7bd4d19b48d39256c73f12daaeee10b71cdfc111d56ce60
               edd23287d490c3f53147976983826d38""",
            "",
            auth_key="11" * 32,
        ),
        "sha256",
        16,
    ),
    # ip xfrm state add src 10.125.0.2 dst 10.125.0.1 proto esp spi 546 reqid 1 \
    #   mode tunnel enc 'cbc(des3_ede)' \
    #   '0x7468726565646966666572656e743862797465736b657973' \
    #   auth digest_null '' flag align4
    with_icv(
        Vector(
            "linux-cbc-des3-ede",
            "3des-cbc-hmac-sha1",
            b"threedifferent8byteskeys".hex(),
            0x222,
            1,
            False,
            """0000022200000001
               365c9b4137c8591e3963e86bf70d97541384f6816619e7cb7594f10b8ea3f1a0
               3e8851c450d0a91f1625c6bde90bdcaef81300a38c53ee1c96c0fe9970ab9477
               d7c4e8fd9f9628b89520867b19bc8ff596b07ecc0483ae4da3ba1d44f0ba2ecd""",
            "",
            auth_key="22" * 20,
        ),
        "sha1",
        12,
    ),
]

# scapy's known-answer packet: AES-CBC + HMAC-SHA-256-128, ESN high 68,
# transport mode (inner TCP "hello world"), fixed IV 11223344...
SCAPY_ESN_KAT = Vector(
    "scapy-cbc-sha256-esn68",
    "aes-cbc-hmac-sha256",
    "85ee354b4675a9c5d16e3d6f4118043b",
    0xCF54CCDF,
    (68 << 32) + 1,
    True,
    """cf54ccdf0000000111223344112233441122334411223344
       f5bda519c9ae64f283f0fc18a8d253eca8b34c2120c8958a97ec9d8e67756da2
       523fce9b5541c57fddf090afc2bfd97e8703203953f853eb61482e4c1384d4c8""",
    "",  # TCP header + "hello world" + trailer; checked in its own test
    auth_key="6f79bf94da7dde3c86009934d9258f1b3fc2f5382aca9c9cb8e216eed235f34c",
    expected=Drop.BAD_NEXT_HEADER,  # transport mode: next header 6
)

WITH_PLAINTEXT = [*GCM_DRAFT, RFC7634, *RFC3602]
ALL = [*WITH_PLAINTEXT, *LINUX, SCAPY_ESN_KAT]


def inbound_for(vector: Vector) -> InboundSA:
    """An inbound SA whose window expects exactly `vector.seq` next."""
    sa = InboundSA(
        SAConfig(
            spi=vector.spi,
            transform=vector.transform,
            key=unhex(vector.key),
            auth_key=unhex(vector.auth_key),
            replay_window=64,
            esn=vector.esn,
        )
    )
    if vector.seq > 1:
        sa.replay.reset(vector.seq - 1)
    return sa


def ids(vectors: list[Vector]) -> list[str]:
    return [v.name for v in vectors]


@pytest.mark.parametrize("vector", WITH_PLAINTEXT, ids=ids(WITH_PLAINTEXT))
def test_plaintext_byte_for_byte(vector: Vector) -> None:
    sa = inbound_for(vector)
    assert sa.transform.open(unhex(vector.packet), vector.seq) == unhex(
        vector.plaintext
    )


@pytest.mark.parametrize("vector", ALL, ids=ids(ALL))
def test_vector_passes_the_icv(vector: Vector) -> None:
    sa = inbound_for(vector)
    result = sa.open(unhex(vector.packet), now=0.0)
    if vector.expected == "open":
        assert isinstance(result, Opened), result
        assert result.seq == vector.seq
        assert result.next_header == NEXT_HEADER_IPV4
        if vector.plaintext:
            plaintext = unhex(vector.plaintext)
            pad_length = plaintext[-2]
            assert result.payload == plaintext[: -2 - pad_length]
    else:
        assert result is vector.expected
    assert sa.counters[Drop.ICV] == 0


@pytest.mark.parametrize("vector", ALL, ids=ids(ALL))
@pytest.mark.parametrize("where", ["icv", "ciphertext", "iv", "seq"])
def test_altered_twin_is_rejected(vector: Vector, where: str) -> None:
    packet = bytearray(unhex(vector.packet))
    offset = {"icv": len(packet) - 1, "ciphertext": len(packet) // 2 + 3, "iv": 9}
    # a changed sequence number must fail the ICV, not slip through: choose
    # one to the right of the window so the replay check lets it reach the ICV
    if where == "seq":
        packet[7] ^= 0x04
    else:
        packet[offset[where]] ^= 0x20
    sa = inbound_for(vector)
    assert sa.open(bytes(packet), now=0.0) is Drop.ICV
    assert sa.replay.top == max(vector.seq - 1, 0)


def test_linux_inner_is_an_echo_request() -> None:
    for vector in LINUX:
        result = inbound_for(vector).open(unhex(vector.packet), now=0.0)
        assert isinstance(result, Opened), vector.name
        inner = result.payload
        assert inner[:2] == bytes.fromhex(LINUX_INNER_PREFIX)
        assert int.from_bytes(inner[2:4], "big") == len(inner)  # total length
        assert inner[9] == 1 and inner[20] == 8  # ICMP echo request


def test_scapy_esn_kat_plaintext() -> None:
    sa = inbound_for(SCAPY_ESN_KAT)
    plaintext = sa.transform.open(unhex(SCAPY_ESN_KAT.packet), SCAPY_ESN_KAT.seq)
    assert plaintext is not None
    assert plaintext[-1] == 6  # TCP, transport mode
    assert b"hello world" in plaintext
    # the same packet checked with the ESN high half left out must fail
    wrong = inbound_for(SCAPY_ESN_KAT)
    assert wrong.transform.open(unhex(SCAPY_ESN_KAT.packet), 1) is None
