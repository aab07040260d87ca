"""What the engine makes of a CPU: its flags read from /proc/cpuinfo, the kernel level chosen (and
forced lower by BUDRT_CPU_ISA, never higher), bf16 activations only with hardware bf16 at the
avx512 level, and the compiler flags of each level's build."""

from __future__ import annotations

import pytest

from budrt.engine import cpu_features, kernel_build, kernels
from budrt.engine.cpu_features import CPUFeatures, bf16_rule, choose_level, parse_cpuinfo

_COMMON = "fpu vme de pse tsc msr pae sse sse2 ssse3 sse4_1 sse4_2 avx"
EPYC = f"""processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: {_COMMON} fma f16c bmi1 avx2 bmi2 sha_ni vaes
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: {_COMMON} fma f16c bmi1 avx2 bmi2 sha_ni vaes
"""
SAPPHIRE_RAPIDS = f"""processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: {_COMMON} fma f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni \
avx_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
# AVX-512 without VNNI/BF16 (Skylake-X): the avx2 level only.
SKYLAKE_X = f"""model name\t: Intel(R) Xeon(R) Gold 6148
flags\t\t: {_COMMON} fma f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2\n"


def features(text: str) -> CPUFeatures:
    parsed = parse_cpuinfo(text)
    assert parsed is not None
    return parsed


def test_cpuinfo_flags_are_read_from_the_first_processor() -> None:
    epyc = features(EPYC)
    assert epyc.model == "AMD EPYC 7B13"
    assert epyc.flags() == ["avx2", "fma", "f16c"]
    assert not epyc.avx512f and not epyc.avx_vnni and not epyc.amx_tile
    spr = features(SAPPHIRE_RAPIDS)
    assert spr.avx512_bf16 and spr.amx_bf16 and spr.amx_int8 and spr.avx_vnni and spr.avx512dq
    assert "avx512_fp16" not in spr.flags()  # not a flag of interest
    assert parse_cpuinfo(ARM) is None  # no "flags" line: detect() falls back to torch's capability


def test_the_best_level_needs_every_flag_of_it() -> None:
    assert features(EPYC).best_level() == "avx2"
    assert features(SAPPHIRE_RAPIDS).best_level() == "avx512"
    assert features(SKYLAKE_X).best_level() == "avx2"
    assert features(SKYLAKE_X).missing("avx512") == ["avx512_vnni", "avx512_bf16"]
    assert CPUFeatures("old", avx2=True).best_level() is None  # no FMA/F16C


def test_auto_takes_the_best_level_or_none() -> None:
    detected = choose_level(features(SAPPHIRE_RAPIDS), None)
    assert detected == ("avx512", "detected: the best level this CPU runs")
    level, why = choose_level(CPUFeatures("old", avx2=True), None)
    assert level is None and why == "unavailable: the CPU lacks fma, f16c"


def test_a_forced_level_may_be_lower_never_higher() -> None:
    level, why = choose_level(features(SAPPHIRE_RAPIDS), "avx2")
    assert level == "avx2" and why == "forced by BUDRT_CPU_ISA=avx2 (the CPU runs avx512)"
    assert choose_level(features(EPYC), "avx2")[0] == "avx2"
    with pytest.raises(ValueError) as raised:
        choose_level(features(EPYC), "avx512")
    message = str(raised.value)
    assert "BUDRT_CPU_ISA=avx512" in message and "AMD EPYC 7B13" in message
    assert "lacks avx512f, avx512bw" in message and "it has avx2, fma, f16c" in message
    assert "at most avx2" in message


def test_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in (("", None), ("auto", None), (" AVX2 ", "avx2"), ("avx512", "avx512")):
        monkeypatch.setenv(cpu_features.ENV_ISA, value)
        assert cpu_features.forced_level() == expected
    monkeypatch.setenv(cpu_features.ENV_ISA, "sse4")
    with pytest.raises(ValueError, match="expected one of avx2, avx512 or auto"):
        cpu_features.forced_level()
    monkeypatch.delenv(cpu_features.ENV_ISA)
    assert cpu_features.kernel_level()[0] == cpu_features.detect().best_level()


def test_bf16_activations_need_hardware_bf16_and_the_avx512_level() -> None:
    spr, epyc = features(SAPPHIRE_RAPIDS), features(EPYC)
    assert bf16_rule(spr, "avx512") == (True, "bf16: dot products in hardware (avx512_bf16, amx_bf16)")
    native, why = bf16_rule(spr, "avx2")  # BUDRT_CPU_ISA=avx2: fp32 activations too
    assert not native and why == "fp32: the CPU has avx512_bf16, amx_bf16 but the kernel level is avx2"
    native, why = bf16_rule(epyc, "avx2")
    assert not native and why.startswith("fp32: no bf16 dot products in hardware")
    assert not bf16_rule(spr, None)[0]  # no kernel level


def test_each_level_compiles_with_its_own_explicit_flags() -> None:
    avx2, avx512 = kernel_build.compile_flags("avx2"), kernel_build.compile_flags("avx512")
    assert avx2 == [
        "-O3",
        "-fopenmp",
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX2",
        "-DCPU_CAPABILITY_AVX2",
    ]
    assert avx512[:5] == avx2[:5]
    for flag in ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16"):
        assert flag in avx512 and flag not in avx2
    assert avx512[-2:] == ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    assert not any("march" in flag for flag in avx2 + avx512)  # valid on any CPU of the level
    paths = {level: kernel_build.library_path(level) for level in cpu_features.LEVELS}
    assert paths["avx2"].name.startswith("budrt_cpu_kernels_avx2-")
    assert paths["avx512"].name.startswith("budrt_cpu_kernels_avx512-")


@pytest.mark.parametrize("level", cpu_features.LEVELS)
def test_every_level_compiles_here(level: str) -> None:
    """Built without loading (this CPU may not run the level): what `make` does for each. Cached
    after `make`; about a minute per level when not."""
    assert kernel_build.build(level).is_file()


def test_describe_names_the_level_in_use_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    loaded = kernels.prepare()
    described = kernels.describe()
    level, why = cpu_features.kernel_level()
    assert described["cpu"] == cpu_features.detect().model
    assert described["cpu_flags"] == cpu_features.detect().flags()
    assert (described["kernel_level"], described["kernel_level_reason"]) == (level, why)
    assert described["kernels_loaded"] is loaded
    assert described["kernels"].startswith("loaded" if loaded else "not loaded")
