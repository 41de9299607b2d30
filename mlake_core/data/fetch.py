"""``mlake data fetch --dataset NAME``: download another dataset's public files.

Each file is downloaded from the public repository at the commit its reader was written
against (:mod:`mlake_core.data.mzsre`, :mod:`mlake_core.data.bmike`), checked against the
SHA-256 recorded here (computed from the files at that commit), written to a temporary
name beside its destination and renamed into place: an interrupted or failed download never
leaves a partial file.  Files already present with the recorded checksum are kept.

Only the files the readers read are fetched: MzsRE's ``mzsre_test_duplicate_en{x}.json``
(11 files; every language's side is identical in all 121 pair files, and the ``en{x}`` files
hold all 12 languages), and BMIKE-53's ``{task}/{prefix}{lang}.json`` for the 52 languages
besides English (the ``*_test_en.json`` and ``*_test.json`` files are not read): 52 files
and about 50 MB per task.  MzsRE is about 10 MB.

Without internet the download fails with the address tried and where to put the file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlake_core.errors import ConfigError, DataError


@dataclass(frozen=True)
class FileSet:
    """The public files of one dataset.

    Attributes:
        base_url: the address the relative paths are joined to.
        folder: the sub-folder of ``--dest`` they are written to (the reader finds it).
        sha256: relative path -> SHA-256 of the file as published.
    """

    base_url: str
    folder: str
    sha256: dict[str, str]


MZSRE_SHA256: dict[str, str] = {
    "mzsre_test_duplicate_encz.json": "ba48291fb74b4a595650a582b4013aa4e9a34ea80cb920f144974ebc179dd390",
    "mzsre_test_duplicate_ende.json": "8dd490b2f562254c7d1a576652402ee07ba8bb12c0749907560ebd1c04500fe5",
    "mzsre_test_duplicate_endu.json": "95e8cf7542a436213206a5c8c320562588e2326e00578cd6d245e09582fa2c47",
    "mzsre_test_duplicate_enes.json": "1456f3907bd4455e0e6ad56cad9eae42b4ed5fe7a94dd1328183c98da6f62365",
    "mzsre_test_duplicate_enfr.json": "306a8da78fbc525982a44211b0a3d14eafb302e6600d38e564b280f3d7443590",
    "mzsre_test_duplicate_enpt.json": "7876dd3ee38f8f812f66e2a212ee9eeb2bf5026ec517e9b72ffce0e6784d319e",
    "mzsre_test_duplicate_enru.json": "75a5433203ad1ade1c61ba340b21eaa99c3dbeee6b28c0ca5967edd04a768781",
    "mzsre_test_duplicate_enth.json": "674f0f2841c3020011cf9aa9bf649d4b4d162af572bd2d85eacba5acf37ca8ab",
    "mzsre_test_duplicate_entr.json": "e0202e661d8bbb6548d480e809071cebc3941779840bb8941bcd2d910ac79e1e",
    "mzsre_test_duplicate_envi.json": "f201792c1098880983349a2405bc8f582e0f9e7c8e65d6a4d2bd35fe1c967ada",
    "mzsre_test_duplicate_enzh.json": "fc6b0da1e84abc1bda2017a413d72b9227aea5ef9ddcff41223340f7c06f997a",
}

BMIKE_SHA256: dict[str, str] = {
    "CounterFact/counterfact_test_af.json": "6ac490e748a6d397ffcaf0b377609b98c99d542b11319290f95ef4ac9ba9aa1a",
    "CounterFact/counterfact_test_ar.json": "31163988efa6a0cde8c10321fae31d2f090cbb3aa93d35b25066d58ee4765cea",
    "CounterFact/counterfact_test_az.json": "cf825322d503b7daf6b7460e8954a31f833d65208bb73b5a31e7ad065be94d31",
    "CounterFact/counterfact_test_be.json": "92d06cb5dcc5bc8256c0a7d4794cd9badedcde9df4d2b90daee6c0a03d97c183",
    "CounterFact/counterfact_test_bg.json": "283e5030c983e2c5122518960f84a588166b7d582d313b3c8ee456210eb0d5d1",
    "CounterFact/counterfact_test_bn.json": "7b55f1df7c52d3ad3fd5fd44a9a4d946b96634d9d5390e0a2f9ab1c5719cf7e9",
    "CounterFact/counterfact_test_ca.json": "55a1ae1e9cb252eed7c7f80eefe85ac222758864dab6de82152f1b4aab9d2e78",
    "CounterFact/counterfact_test_ceb.json": "b1439f63ddb66ffeb49d3f3f132970678b5545df9e2112ef5015cd99de1f3991",
    "CounterFact/counterfact_test_cs.json": "a97bb2933e427c87ca45be15a3397a56bab79304c1968c6be3f007e6311235fb",
    "CounterFact/counterfact_test_cy.json": "1ed3448029ca74348c4c2d3b1eda1b950df7186e715503d9405fb1dda1a63fa3",
    "CounterFact/counterfact_test_da.json": "eb9fea2778e2610c803eb8276b0f02f0f15f2b72d95db30bb3febd1016936c9e",
    "CounterFact/counterfact_test_de.json": "89fdd5d25bd9992f8de3b1b7c00bd721a897b85935d01b44133f81d3654c38bc",
    "CounterFact/counterfact_test_el.json": "432205ca8a12eeb8db189135e636ccd4ded6a9e332b3839bc330edc6c30dd884",
    "CounterFact/counterfact_test_es.json": "defce222ee9f9de7e52a00fadc517e10c2bf01a8a2cc195a9a52c8d68b8e7a2f",
    "CounterFact/counterfact_test_et.json": "1b136a31647f9a7748c0bcf76462061867bcb391d6a10a419210c58008da1af3",
    "CounterFact/counterfact_test_eu.json": "1ffba0ea5797fa9fe5ec82b028086395e165e216265181056667b02a16eccdb1",
    "CounterFact/counterfact_test_fa.json": "c7aea43acd6fdc2aa861135e1cfaf12e6a989b49da56eaac3fe5937adfa75c9a",
    "CounterFact/counterfact_test_fi.json": "3bfc91831f69af44bba0f5c9af1f5361fabaf8f3f23096a5750a03e261e7a768",
    "CounterFact/counterfact_test_fr.json": "a36efe8566e50202f79c6f2aa24e8d52354980ce133a16809d186686218e3bce",
    "CounterFact/counterfact_test_ga.json": "8aa5dc7fdde134f2a9bc8861b59a288b35cd9645e477e83875686a4a875d8b67",
    "CounterFact/counterfact_test_gl.json": "2705ae9d173f784f3242ab0852d63e7c5f090d8abcc1076badc499f239c82538",
    "CounterFact/counterfact_test_he.json": "c55dd94d8b634abaca38b122d4d680db2473bc5f9d0596d88e6c8adafe050c61",
    "CounterFact/counterfact_test_hi.json": "ac8ffa118b3f282ef9c9284e3ece53ba995f9cf86c354018fac02bfd023fcc13",
    "CounterFact/counterfact_test_hr.json": "8ba9a3b07f40d9ea22387a3c714452564e953e824fb3dc18c7157f4b45d4254a",
    "CounterFact/counterfact_test_hu.json": "cb41db718bc1a1cf99852d101b4a9a1a2bec2a83fbb3ed1a64d4c9b1406f2bf8",
    "CounterFact/counterfact_test_hy.json": "e1afe8f603486af484cbb0776971c65dcacdd43755de4084f9a6918b34c03f1d",
    "CounterFact/counterfact_test_id.json": "94ffc81c62de303fa2bf8ae2faaf281c767ef6669be7296a0d92b028ad774c8a",
    "CounterFact/counterfact_test_it.json": "94ce21a3e69cd6abd929b970e1033a537d0f9da9b89c1528707981eea2b70e7b",
    "CounterFact/counterfact_test_ja.json": "261ee9905e12b2d1988b882960becb5a23443d88fa75c37d5274317fa94e7ea1",
    "CounterFact/counterfact_test_ka.json": "d8379db5a2c2498439cf7c1b6cfcc4d081754200718f78c31ba3c3097b99ddc4",
    "CounterFact/counterfact_test_ko.json": "c636b6bdcd8e649947098d09647818404ac1fa3470487b0fcba9828b748493ea",
    "CounterFact/counterfact_test_la.json": "c28fe2ed3d7d95afba4bb7fbbf13dfe04ae4d647d0b15335248788ef13117aa0",
    "CounterFact/counterfact_test_lt.json": "33726a4e0f61d9ae99bff10ed47f958db8c41e33d46d0047b28575e9428df921",
    "CounterFact/counterfact_test_lv.json": "e6587a3385796170e647c7177cef51a6ab8ef1c662b87e2663168227c46e0bc6",
    "CounterFact/counterfact_test_ms.json": "21f3d1cac12392c627cecde605b1a7cd0e55529b8e1c097301d1736f00ae90e5",
    "CounterFact/counterfact_test_nl.json": "fabd0a87b52567efb99c41f7f98f4103bbaa31a4dd510649f5651f8d72fc6373",
    "CounterFact/counterfact_test_pl.json": "ef51545ee111932f3c1095b5b1dd7c69c14bd30d8ce0bc183122e3437c93547b",
    "CounterFact/counterfact_test_pt.json": "dd4ff73c5740d3d785bd03cfce08fc6ffec28b3a116eb890e8f973e73ea5ed13",
    "CounterFact/counterfact_test_ro.json": "e4128f058083c4b66e4846ab367b9bec5ec01cf2ed17931647a17b4640e97e8a",
    "CounterFact/counterfact_test_ru.json": "91016e87c1f32aa517e645c25442a512fe92b5ef029e4f5b372d553c60e426e8",
    "CounterFact/counterfact_test_sk.json": "21e34a1835b5002cb776e226ee0f5553a9c5c790519dbf0ffce3e2f3c890d422",
    "CounterFact/counterfact_test_sl.json": "016b350d685a5d6e02b115a062e90ba6b73d6bc07b137a580dc77e499f41da94",
    "CounterFact/counterfact_test_sq.json": "feab8d091c3f326c3aa6089551054c364b28ab4ae44c1009681d0e0367a95e62",
    "CounterFact/counterfact_test_sr.json": "aa77a6e2c046966a89d73fddc96c26dd513fd98eb6dc3f4a5d6a31a141cd87c9",
    "CounterFact/counterfact_test_sv.json": "b2e0809c692ae0fc605b64bac87b8db81d2fa75823b68aefd9aa6ad2fc744ad9",
    "CounterFact/counterfact_test_ta.json": "f8fb22f86660ab49a72c17e2e76ee27ea260da9b692637c858342eaa3b5f4068",
    "CounterFact/counterfact_test_th.json": "ac816d5ec1a2fbf22575544191c70ff39ca1bb4d04ce14e89289e0959c36fd20",
    "CounterFact/counterfact_test_tr.json": "6e024ff5e7a3c798d86bce215c18783379025d73c8c0e0cb84301cddcf0a0eb9",
    "CounterFact/counterfact_test_uk.json": "3d1f9a41e0e2477d392baaff5474e30b9b69d722878fb4b2909b932d10015754",
    "CounterFact/counterfact_test_ur.json": "5be83e58d7598863d53ee53d97053a1b39f47fe977f9969374bb5f75ece70514",
    "CounterFact/counterfact_test_vi.json": "8ae15cf62dd3e3fed383150c4e10fae4a2f28168921bc7c67a7749905f76725f",
    "CounterFact/counterfact_test_zh.json": "f942f9f7c16882a28dbe710a5fbdae56401389eef5ca1c999150ce594e438706",
    "WikiFactDiff/wfd_test_af.json": "934eb331ff17b4fd8d79cf3f6b184a1ac3ca86cc6c3fbe2edd79888d1897b7b6",
    "WikiFactDiff/wfd_test_ar.json": "fd38d878e0379814bfae603e5763dd1f9c8cfd771774486d45f8a970809da1e5",
    "WikiFactDiff/wfd_test_az.json": "aceb16f498b697eb37da2eda3e3089774f3597e0299a24ba8c71aeafa47e0666",
    "WikiFactDiff/wfd_test_be.json": "3f18badefd4ad84b4d7471705ea9314ed80c827694b88995437e81698f06dd4a",
    "WikiFactDiff/wfd_test_bg.json": "d466189bbfccf394950a54eaa9ced2978b8833be60f80c5b02fd579ad8a920bf",
    "WikiFactDiff/wfd_test_bn.json": "359532881e5ee6b84178eb569dc8d51d676045410343ffb2e973a2a16ffe3d36",
    "WikiFactDiff/wfd_test_ca.json": "dc169b47e568561bdcb19b631cb46f14b2dfe7cbeff306e967ed5edaa33a5c84",
    "WikiFactDiff/wfd_test_ceb.json": "7abafe8ff0e3a78794e659deaf39d371cb362b650e22b0dfeb319f0f4808440c",
    "WikiFactDiff/wfd_test_cs.json": "8c40b258a2b0726d2f5b20404b3621d37748b534dd3278fd8ccd090829965448",
    "WikiFactDiff/wfd_test_cy.json": "09b9049507a09f93fc7cd6539081bf02223ec7d2f8b204bbdaca2c50a8485805",
    "WikiFactDiff/wfd_test_da.json": "2c1a48e419161d7a8346cc5291f26b7f2a850d295b64a695f3783be9b36a9e4e",
    "WikiFactDiff/wfd_test_de.json": "301700798432a2bd6c991ca89a9847301d0d70912c19889d5f67e7c5a38eeccf",
    "WikiFactDiff/wfd_test_el.json": "2a2a7e13da5b63abac7738a27954c49f6da1d23a13be2de6f537683f1dacd93f",
    "WikiFactDiff/wfd_test_es.json": "95af77aa13a96b69c2ffe02cc23009db782ff00de9f6ceb5f7c55247e5ffb983",
    "WikiFactDiff/wfd_test_et.json": "94d18a5f0c4d50b43c1b8d77137ac8b019bdadafecc5ae6bc3198f2661412081",
    "WikiFactDiff/wfd_test_eu.json": "eb7b0dd1649b647a06de6d5e10e2049df84184ea96bbadad92f6e673b6c7439c",
    "WikiFactDiff/wfd_test_fa.json": "55cc85a790e28766b8870ff402de8ba3a86d02d89c0665a829d3eed6bc153554",
    "WikiFactDiff/wfd_test_fi.json": "d97a81cbd4e8445718f89ceeea18445cb57fd80af7ab809ef4a9bd75c0cc4e42",
    "WikiFactDiff/wfd_test_fr.json": "5540a76475ebd0230a571bac04391cb3405d2a29625777f7f937787a11650122",
    "WikiFactDiff/wfd_test_ga.json": "16d5d3d04f6a50f9c0f1a0d8c4a1758b4185a16946a808677a5903d5da062713",
    "WikiFactDiff/wfd_test_gl.json": "fa782d2878c85f2e08706564713b688df73dd0ea91a0ef0b791d24372c65641c",
    "WikiFactDiff/wfd_test_he.json": "c7685715b2317d3112d48e34e38cf23bd00a030a42e43294afad4f704ced682d",
    "WikiFactDiff/wfd_test_hi.json": "28dcb4697b62832439725778c8664ab54b17d3b5c5179e250be702ea72560b98",
    "WikiFactDiff/wfd_test_hr.json": "d9d1d85da04fb60b3154eeae05f938b729a4d417e0615f09db37c34164d1bb76",
    "WikiFactDiff/wfd_test_hu.json": "cd127feb89211985983ee188837637811f72580e26eddbe4e6695c3516903b56",
    "WikiFactDiff/wfd_test_hy.json": "d8aa607c34c979a6e84e8a768dfb3dfd2a936aea9bdf2bbd29d29e14f02437c0",
    "WikiFactDiff/wfd_test_id.json": "9c6228dfceb2e1f98f11a1a2cdef4c7f02a5c42e524e7912286d8c15f62776d0",
    "WikiFactDiff/wfd_test_it.json": "c9cbc24f578ca629edc22860e0469ab3c8454df4761ac59ff149e701f212b130",
    "WikiFactDiff/wfd_test_ja.json": "92bcab7693334e48583fa9a0e8c8eb6a93f68920196c112bad9caf9b7775d8c2",
    "WikiFactDiff/wfd_test_ka.json": "6fc1be66bf8de6d3f2e6a623f82245fd49b1516b74087d8574a148aea210cb73",
    "WikiFactDiff/wfd_test_ko.json": "a63c40a59eeb3b69a6fd9ce3d03f0e4434257e28ecbcf1e2ac83bdfe7ac50af8",
    "WikiFactDiff/wfd_test_la.json": "21523f2acb42ba90810db088657d66f9e30446f1fc578063554e6c323f789325",
    "WikiFactDiff/wfd_test_lt.json": "237650aa026e3ed8510ad7b6dd4c3ee5be37726eeee2635206023361be212f06",
    "WikiFactDiff/wfd_test_lv.json": "d2989dfae959e87c42ba96801596d45c05ad01c742fee025bff20483c2b780e4",
    "WikiFactDiff/wfd_test_ms.json": "6702b1aea903a82f1f3083f01a04650cb4b1ed7ffe8efea1cf3b266c319f455b",
    "WikiFactDiff/wfd_test_nl.json": "c2f9086c469376ffad17b63a9d75e0d6e1827006808dd6422a8cd94d5a5285ea",
    "WikiFactDiff/wfd_test_pl.json": "fa38e72cee92b775e6a902fc77d1a0ade4046ad37eb6461781e8d25c88abc5bb",
    "WikiFactDiff/wfd_test_pt.json": "d9fe64b66f6931c770d1fc01b8a56a0def1024ef269d7c6e982248bc066b3f97",
    "WikiFactDiff/wfd_test_ro.json": "43498badc55eaab38e2860e1b0b35dcb336cc891a67b3110ee47552aff0c3e4f",
    "WikiFactDiff/wfd_test_ru.json": "f157b636647a4d1c51ab1ce410e64050abb0c7297d184c53d05b660299bf73c6",
    "WikiFactDiff/wfd_test_sk.json": "1ca3e9822618445a69196312f1002255409842ae71d1cc09cebf475c440847e1",
    "WikiFactDiff/wfd_test_sl.json": "ac2e7e400681118cb6f11ead0f6cd5e081b383130669adfda43aa4f508f471b2",
    "WikiFactDiff/wfd_test_sq.json": "c0968d9005b5f84061614f3af0d73c1d15e15676bdfca2b040d74787194c1671",
    "WikiFactDiff/wfd_test_sr.json": "f7305c018fb0f93887afd7eb3c8682024c94d983fe915b888d509e74b3670bb5",
    "WikiFactDiff/wfd_test_sv.json": "0359aad66f14df75d57f74ba60ff828eb65e7d9ab082a802260a1195a604bb39",
    "WikiFactDiff/wfd_test_ta.json": "03ebef1200e2ec414537c109c75c56aa5ef294104880776d65c088a919e0dc88",
    "WikiFactDiff/wfd_test_th.json": "fce91b7c54254ae6d1dc0d22db10a22797dfe4773cf7c79e41d74cbd5b7d044d",
    "WikiFactDiff/wfd_test_tr.json": "ea72c12e0dcd52c3ce41ef8e7281b2b15239e7c151b53f19894732ecb06980a9",
    "WikiFactDiff/wfd_test_uk.json": "38a845e48db87e3b33c3fdfc71ebc467c74ec08740880f45177c8f776bf171db",
    "WikiFactDiff/wfd_test_ur.json": "47e93bf1f84a2cc84d99e742310791d9c36c970bccaa54252e6a488d3d9e3989",
    "WikiFactDiff/wfd_test_vi.json": "b44323a3d608727331b196ce4ff2b79812f1bf2fe1bc634b59473be09525cb64",
    "WikiFactDiff/wfd_test_zh.json": "6092e327e6bd0605d90a6a48b1a95fa37d9fb0f500155506318264ce1d045727",
    "zsRE/zsre_test_af.json": "fa71016c4b3083abb9b20138923cc8ed70e2c1c636d1ed491c38ac7a60f0622a",
    "zsRE/zsre_test_ar.json": "bec8ac44928d9fd74b892ac7827e156b4b473dd8c0cac72dcb29e7032ff2267f",
    "zsRE/zsre_test_az.json": "b2ec3b771612e6feb83150964558f65f72abb48ee535a83bc98aa84fca98e21a",
    "zsRE/zsre_test_be.json": "3bdb6413e47ffe584425c9cb500a2142528be7ae36e0a14335c337523673ad7f",
    "zsRE/zsre_test_bg.json": "d1f483499906ae18f66d952bfd3413a75c53f09240121f8d83cbbc5af416ad77",
    "zsRE/zsre_test_bn.json": "dd34c4d6213769967d8bb54ea82a0a5e906a669819b0f00f5ec18e950c94cac4",
    "zsRE/zsre_test_ca.json": "2ae263171b4ab980296688081c162fee4b6469568d6a31b78ae549766e9f27c0",
    "zsRE/zsre_test_ceb.json": "a5e876c50cc905a3b9e555dbdcdd407ece6710208bcbed23af3f393a7d23b9e8",
    "zsRE/zsre_test_cs.json": "2c595fd7db2b661382350fbd29f9b2dd3df5882648470f0fb439925e37b29145",
    "zsRE/zsre_test_cy.json": "937594f9eb2cef80b2faf1e65a8a4a4bd0744c8cae6c3946b2e9ac34f7bbbfad",
    "zsRE/zsre_test_da.json": "4a2db0427fc32850483c4ffef8b131b418e959c5a20c4d9d05873bd553d7ac39",
    "zsRE/zsre_test_de.json": "5becfdbb593f387e8609c4a30c465cb29d1a58a33c80086277ca5494c3a4cde9",
    "zsRE/zsre_test_el.json": "255ea45bef43dd82bc84bdc659b91a7fc34b42196a95a44e2d2f08efbae15f28",
    "zsRE/zsre_test_es.json": "6c0f8e68da51bfe0b3520fa6e4e9b07bf6a7a62c4d90c9f25969b518b84a3d03",
    "zsRE/zsre_test_et.json": "92b53c04a1c7ddb3cd11fbe5149263f8525cc6eb805189d35bd91bb5fd3977ac",
    "zsRE/zsre_test_eu.json": "6975d2b4c55688cf4eb5eb59ed92307ff55529e35c021571aefcf8c8e9ff73ad",
    "zsRE/zsre_test_fa.json": "c1ed680143a3a327006d2421abb972209f94cc906e4aea0dc3b0e2690506d59c",
    "zsRE/zsre_test_fi.json": "a6e1b0c2791a55ec343b3c5bc2e9eaa970699da67876151ff46fd4dcbb635435",
    "zsRE/zsre_test_fr.json": "1375e3674c6919d56dcb635223c20718414c211a473a09160bf4a05330511fbb",
    "zsRE/zsre_test_ga.json": "c47ae0268cd1b8da179133c0a83fd74fe3db032050e9224217318acb8e1d1ec1",
    "zsRE/zsre_test_gl.json": "aa02c364a9266350f957b6446c27770dbf114cdadc55baff931c1fa7062c3ccf",
    "zsRE/zsre_test_he.json": "e02e342afa1a6fedde338feb4ad38db6bcdccb1c8d647b72a2a4e4fb56cb807c",
    "zsRE/zsre_test_hi.json": "92973b0f3f3df3d9836c17d2075da1731f1c63a03146ab73140c2c06533aaf6e",
    "zsRE/zsre_test_hr.json": "41b2095a0f5a9a7b21d1908b1dda733da95f0765959533d72112397b96ef122d",
    "zsRE/zsre_test_hu.json": "f5fbc70b3aa205e7fa1f24ee48cdaa43b84fb6073bd41ad44b4bb116361ebf14",
    "zsRE/zsre_test_hy.json": "429446517099fff4fee3bd139662f4b63bb40571b65a2ffb92471a069a6dd62a",
    "zsRE/zsre_test_id.json": "1cae04c3690913fd9a11add96cda9fc65e9bde977efa02decb81245938ed0281",
    "zsRE/zsre_test_it.json": "e1020853646e38f648a3a6ccd53e60d271666e48be80eb8c0cda2dde7e8c4f0b",
    "zsRE/zsre_test_ja.json": "bb0b0595e2a0176d10660d91463b2b1e2332e7159bbcfd3e3f1785e0be322115",
    "zsRE/zsre_test_ka.json": "464de2a64256fe697a2aa07943ab7f9cd60d4e1d2707cdee5d504a1c328871db",
    "zsRE/zsre_test_ko.json": "a13668bf6be78d6e97959f969b67df160faeb924d678d224e987f39e595d32b2",
    "zsRE/zsre_test_la.json": "cd5e1ae5888b1474d3023f07bf712635043dc1000521f71d03b9f61c106951dd",
    "zsRE/zsre_test_lt.json": "ae8bc74e2994049019273486913db42fab8dc18e821454914768a864fb9f9227",
    "zsRE/zsre_test_lv.json": "8501bd31fb06ffcbafa715afa0fe6f199c080d540b798af515422cd8f8d29e36",
    "zsRE/zsre_test_ms.json": "a790469703b072c053ce1f5448c78e207cdea264b8d0deb27ce5330f8c5e65ba",
    "zsRE/zsre_test_nl.json": "4347b03c30a88c9152e1a4d0f849dab8f93543fac5883f8bddc42bece93ceeb2",
    "zsRE/zsre_test_pl.json": "14839322aeb5014d0854575ae8db415a91b7420f16c3bd3edf5105d9f967629f",
    "zsRE/zsre_test_pt.json": "5572fe219b649b63569559b6663fd33da0c3401437821a3ea9f92e83c36a3473",
    "zsRE/zsre_test_ro.json": "b449d7cf73224a78a91cca65198fa5ec3bdd234f542673dd8637aa91a3c8c21e",
    "zsRE/zsre_test_ru.json": "038eb81ef71152bf70def95f7abfdbc4db9c4410800de139c85fa77f7045f3e2",
    "zsRE/zsre_test_sk.json": "7d9e6dbde3e200b017e5c38f1176506eba6678db82a651ea49bbdfeadb18818b",
    "zsRE/zsre_test_sl.json": "3367a7e297e745a7803862894a4c240140d66ae51bc06b2a50cb29a4aaeaff63",
    "zsRE/zsre_test_sq.json": "fb4fb8523479b337c827848f0ef2818da450f9613aa8af1097e5d8824d756965",
    "zsRE/zsre_test_sr.json": "5ecd02dd77b4cef0b138e1366d7996e6c719a5a245d206f225c903a80514150f",
    "zsRE/zsre_test_sv.json": "5742d0a03476dd0af58311e80eadc73a8faf28bcf4826271bc6e3a76ca3f59b5",
    "zsRE/zsre_test_ta.json": "e77649175815ec18d5785667d2ff2bc2a6c53cb18acd63347633186a55dc863f",
    "zsRE/zsre_test_th.json": "dd667522d511168087452e6f6a5182f055dfd9be56397dc24feb0f1ab3ecce9c",
    "zsRE/zsre_test_tr.json": "a5ee489a16675d8a694b89dc4dd2010dcffbcd0b7988edeb0764ea5bbf792144",
    "zsRE/zsre_test_uk.json": "b8efadf4b7c93e557b68bf3766da5d8241fc31217fe0c848f3551ac619c4c4ea",
    "zsRE/zsre_test_ur.json": "2ff771cf4d2601ac9ea1b1fa106be2126f38d0b3ef9ae6425b0209c617a22b4b",
    "zsRE/zsre_test_vi.json": "bef3162b8ee100c99861e2174b9c45b95ad131767787c1be159fd3aaa92af18a",
    "zsRE/zsre_test_zh.json": "107245e5e333fa986bd6c1caa69dcffdf04cb272aaa720490972a5af5fb5fb1d",
}

_MZSRE = FileSet(
    "https://raw.githubusercontent.com/Vicky-Wil/ReMaKE/"
    "f2f9d5a4525cef995873bac242e21fd905bb09ff/data/MzsRE",
    "MzsRE",
    MZSRE_SHA256,
)
_BMIKE_URL = (
    "https://raw.githubusercontent.com/shaobo9856/IKE/"
    "a9b7cac588ffcbf1ca313dbd49dbc35c2d0f7b33/data/BMIKE53"
)


def _bmike(folder: str) -> FileSet:
    """One BMIKE-53 task's files (its folder under ``BMIKE53/``)."""
    return FileSet(
        _BMIKE_URL,
        "BMIKE53",
        {k: v for k, v in BMIKE_SHA256.items() if k.startswith(f"{folder}/")},
    )


#: Registry name -> its files.
FILE_SETS: dict[str, FileSet] = {
    "mzsre": _MZSRE,
    "bmike53-zsre": _bmike("zsRE"),
    "bmike53-counterfact": _bmike("CounterFact"),
    "bmike53-wfd": _bmike("WikiFactDiff"),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, sha256: str | None, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target`` through a temporary file in the same folder, renamed
    into place only once complete and (with ``sha256``) verified.

    Raises:
        DataError: the address cannot be reached (naming it and where the file belongs), or
            the file downloaded is not the one published (checksum).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", None) or err
                raise DataError(
                    f"cannot reach {url} ({reason}); download it yourself from {url} "
                    f"into {target.parent}"
                ) from None
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DataError(
                f"{url}: the file downloaded has SHA-256 {digest.hexdigest()[:16]}..., not the "
                f"published {sha256[:16]}...; nothing was written to {target}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def fetch_dataset(
    name: str,
    dest: str | os.PathLike[str],
    *,
    base_url: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Download dataset ``name``'s files into ``dest/<folder>`` (module docstring).

    Args:
        name: a registry name other than ``mlake`` (``mlake data fetch --version`` fetches
            MLaKE).
        dest: the folder to write; pass it as ``--data-dir`` afterwards.
        base_url: another address holding the same relative paths (a mirror; ``file://``
            works too); the checksums still apply.
        force: download again files already present with the right checksum.
        progress: called with a line per file.

    Returns:
        The folder the files are in (``dest/<folder>``).

    Raises:
        ConfigError: for a name without public files here.
        DataError: a file that cannot be reached or does not match its checksum (files
            fetched before it are kept; none is partial).
    """
    if name not in FILE_SETS:
        raise ConfigError(
            f"mlake data fetch --dataset {name!r}: choose mlake or {', '.join(FILE_SETS)}"
        )
    files = FILE_SETS[name]
    folder = Path(dest) / files.folder
    base = (base_url or files.base_url).rstrip("/")
    for rel, sha in files.sha256.items():
        target = folder / rel
        if not force and target.is_file() and sha256_file(target) == sha:
            continue
        download(f"{base}/{rel}", target, sha, timeout=timeout)
        if progress is not None:
            progress(f"{name}: {target}")
    return folder
