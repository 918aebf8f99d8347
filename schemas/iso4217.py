"""ISO 4217 currency codes, fixed in the code (no network, no data package at run time).

``CURRENCIES`` is ISO 4217 List One as published on 2026-01-01, less the codes that are not
money a customer pays with: the fund codes (BOV, CHE, CHW, CLF, COU, MXV, USN, UYI, UYW), the
precious metals (XAG, XAU, XPD, XPT), the units of account (XAD, XBA, XBB, XBC, XBD, XDR, XSU,
XUA), the testing code XTS and XXX ("no currency involved"). When ISO amends the list (a new
code, a withdrawn one), edit this set, regenerate ``schemas/json`` and note it in the changelog.
"""

from __future__ import annotations

CURRENCIES: frozenset[str] = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND
    BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE
    CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD
    GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD
    MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO
    NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF
    SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB
    TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES VND
    VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()
)

#: ISO 4217's code for "no currency involved": the order service's public facts carry it for an
#: order that never existed (a cancel that arrived before the create).
NO_CURRENCY = "XXX"
