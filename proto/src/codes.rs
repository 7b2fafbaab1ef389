//! The code lists both sides agree on: places (border gates and provinces), handling codes
//! and evaluation codes. Forms carry codes, never free-text place names where a code
//! exists, so that both sides (and the periodic reports) count the same places the same way.
//!
//! The place lists are a seed for the joint committee to confirm: the international border
//! gates named in the bilateral arrangements, and the provinces along the border plus the
//! capitals. A code is `<cc>:<slug>` for a province and `gate:<vn-slug>--<kh-slug>` for a
//! gate.

/// An international border gate between Viet Nam and Cambodia.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BorderGate {
    pub code: &'static str,
    /// Name on the Vietnamese side, in Vietnamese.
    pub vn: &'static str,
    /// Name on the Cambodian side, in Latin script.
    pub kh: &'static str,
    /// The provinces the two sides of the gate are in.
    pub provinces: [&'static str; 2],
}

/// The border gates, as `gate:<vn>--<kh>` codes.
pub const BORDER_GATES: &[BorderGate] = &[
    BorderGate {
        code: "gate:moc-bai--bavet",
        vn: "Mộc Bài",
        kh: "Bavet",
        provinces: ["vn:tay-ninh", "kh:svay-rieng"],
    },
    BorderGate {
        code: "gate:xa-mat--trapeang-phlong",
        vn: "Xa Mát",
        kh: "Trapeang Phlong",
        provinces: ["vn:tay-ninh", "kh:tboung-khmum"],
    },
    BorderGate {
        code: "gate:tinh-bien--phnom-den",
        vn: "Tịnh Biên",
        kh: "Phnom Den",
        provinces: ["vn:an-giang", "kh:takeo"],
    },
    BorderGate {
        code: "gate:vinh-xuong--kaam-samnor",
        vn: "Vĩnh Xương",
        kh: "Kaam Samnor",
        provinces: ["vn:an-giang", "kh:kandal"],
    },
    BorderGate {
        code: "gate:le-thanh--oyadav",
        vn: "Lệ Thanh",
        kh: "Oyadav",
        provinces: ["vn:gia-lai", "kh:ratanakiri"],
    },
    BorderGate {
        code: "gate:ha-tien--prek-chak",
        vn: "Hà Tiên",
        kh: "Prek Chak",
        provinces: ["vn:an-giang", "kh:kampot"],
    },
    BorderGate {
        code: "gate:hoa-lu--trapeang-sre",
        vn: "Hoa Lư",
        kh: "Trapeang Sre",
        provinces: ["vn:dong-nai", "kh:kratie"],
    },
    BorderGate {
        code: "gate:bu-prang--o-raing",
        vn: "Bu Prăng",
        kh: "O Raing",
        provinces: ["vn:lam-dong", "kh:mondulkiri"],
    },
];

/// A province (or municipality) of either country.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Province {
    pub code: &'static str,
    pub name: &'static str,
}

const fn province(code: &'static str, name: &'static str) -> Province {
    Province { code, name }
}

/// Provinces: Viet Nam's along the border (as organised since 2025) and its two largest
/// cities; every province of Cambodia.
pub const PROVINCES: &[Province] = &[
    province("vn:ha-noi", "Hà Nội"),
    province("vn:ho-chi-minh", "Thành phố Hồ Chí Minh"),
    province("vn:quang-ngai", "Quảng Ngãi"),
    province("vn:gia-lai", "Gia Lai"),
    province("vn:dak-lak", "Đắk Lắk"),
    province("vn:lam-dong", "Lâm Đồng"),
    province("vn:dong-nai", "Đồng Nai"),
    province("vn:tay-ninh", "Tây Ninh"),
    province("vn:dong-thap", "Đồng Tháp"),
    province("vn:an-giang", "An Giang"),
    province("vn:can-tho", "Cần Thơ"),
    province("kh:banteay-meanchey", "Banteay Meanchey"),
    province("kh:battambang", "Battambang"),
    province("kh:kampong-cham", "Kampong Cham"),
    province("kh:kampong-chhnang", "Kampong Chhnang"),
    province("kh:kampong-speu", "Kampong Speu"),
    province("kh:kampong-thom", "Kampong Thom"),
    province("kh:kampot", "Kampot"),
    province("kh:kandal", "Kandal"),
    province("kh:kep", "Kep"),
    province("kh:koh-kong", "Koh Kong"),
    province("kh:kratie", "Kratié"),
    province("kh:mondulkiri", "Mondulkiri"),
    province("kh:oddar-meanchey", "Oddar Meanchey"),
    province("kh:pailin", "Pailin"),
    province("kh:phnom-penh", "Phnom Penh"),
    province("kh:preah-sihanouk", "Preah Sihanouk"),
    province("kh:preah-vihear", "Preah Vihear"),
    province("kh:prey-veng", "Prey Veng"),
    province("kh:pursat", "Pursat"),
    province("kh:ratanakiri", "Ratanakiri"),
    province("kh:siem-reap", "Siem Reap"),
    province("kh:stung-treng", "Stung Treng"),
    province("kh:svay-rieng", "Svay Rieng"),
    province("kh:takeo", "Takéo"),
    province("kh:tboung-khmum", "Tboung Khmum"),
];

pub fn border_gate(code: &str) -> Option<&'static BorderGate> {
    BORDER_GATES.iter().find(|g| g.code == code)
}

pub fn province_named(code: &str) -> Option<&'static Province> {
    PROVINCES.iter().find(|p| p.code == code)
}

/// Whether `code` names a place of the lists: a province or a border gate.
pub fn is_place(code: &str) -> bool {
    border_gate(code).is_some() || province_named(code).is_some()
}

/// Handling code of a message, after Europol's SIENA practice; it travels in the header
/// (`H0`, `H1`, `H2`, or `H3:<restrictions>`), so gateways can check it without the body.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Handling {
    /// H0: for law-enforcement purposes only.
    LawEnforcementOnly,
    /// H1: not to be used in court without the originator's permission.
    NotForCourt,
    /// H2: not to be passed on without the originator's permission.
    NoOnwardTransmission,
    /// H3: other restrictions, stated by the originator.
    Restricted(String),
}

/// Why a code is not one of the list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("handling code must be H0, H1, H2 or H3:<restrictions>")]
    Handling,
    #[error("H3 needs its restrictions: H3:<text>, at most 512 bytes")]
    Restrictions,
    #[error("evaluation code must be a source letter A, B, C or X and an information digit 1 to 4 (e.g. B2)")]
    Evaluation,
}

impl std::str::FromStr for Handling {
    type Err = CodeError;
    fn from_str(s: &str) -> Result<Self, CodeError> {
        match s {
            "H0" => Ok(Self::LawEnforcementOnly),
            "H1" => Ok(Self::NotForCourt),
            "H2" => Ok(Self::NoOnwardTransmission),
            _ => match s.strip_prefix("H3:") {
                Some(text) if !text.trim().is_empty() && text.len() <= 512 => {
                    Ok(Self::Restricted(text.to_owned()))
                }
                Some(_) => Err(CodeError::Restrictions),
                None => Err(CodeError::Handling),
            },
        }
    }
}

impl Handling {
    /// Whether the originator's permission is needed to pass the message on (H2 and H3 are
    /// at least that strict: H3 restrictions are read as forbidding onward transmission
    /// unless they say otherwise, which software cannot judge).
    pub fn forbids_onward_transmission(&self) -> bool {
        matches!(self, Self::NoOnwardTransmission | Self::Restricted(_))
    }

    /// Whether an export must carry the not-for-court marking (H1).
    pub fn not_for_court(&self) -> bool {
        matches!(self, Self::NotForCourt)
    }

    /// The header form of the code.
    pub fn code(&self) -> String {
        match self {
            Self::LawEnforcementOnly => "H0".into(),
            Self::NotForCourt => "H1".into(),
            Self::NoOnwardTransmission => "H2".into(),
            Self::Restricted(text) => format!("H3:{text}"),
        }
    }
}

/// Evaluation of a piece of information (the 4x4 system used by Europol and Interpol):
/// source reliability A (reliable), B (mostly reliable), C (not reliable), X (cannot be
/// assessed); information 1 (known to be true), 2 (known personally to the source), 3 (not
/// known personally to the source, corroborated), 4 (cannot be assessed). `X4` is the honest
/// default when nothing has been assessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub source: char,
    pub information: u8,
}

impl std::str::FromStr for Evaluation {
    type Err = CodeError;
    fn from_str(s: &str) -> Result<Self, CodeError> {
        let mut chars = s.chars();
        match (chars.next(), chars.next(), chars.next()) {
            (Some(source @ ('A' | 'B' | 'C' | 'X')), Some(info @ '1'..='4'), None) => Ok(Self {
                source,
                information: info as u8 - b'0',
            }),
            _ => Err(CodeError::Evaluation),
        }
    }
}

impl std::fmt::Display for Evaluation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.source, self.information)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gate_joins_a_listed_vn_province_to_a_listed_kh_province() {
        for g in BORDER_GATES {
            assert!(g.code.starts_with("gate:"), "{}", g.code);
            assert!(g.provinces[0].starts_with("vn:"), "{}", g.code);
            assert!(g.provinces[1].starts_with("kh:"), "{}", g.code);
            for p in g.provinces {
                assert!(province_named(p).is_some(), "{}: {p}", g.code);
            }
        }
        let mut codes: Vec<_> = BORDER_GATES
            .iter()
            .map(|g| g.code)
            .chain(PROVINCES.iter().map(|p| p.code))
            .collect();
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n, "codes are unique");
        assert_eq!(
            PROVINCES
                .iter()
                .filter(|p| p.code.starts_with("kh:"))
                .count(),
            25
        );
    }

    #[test]
    fn handling_codes_parse_and_print_back() {
        for code in ["H0", "H1", "H2", "H3:C02 and AHTD only"] {
            assert_eq!(code.parse::<Handling>().unwrap().code(), code);
        }
        for bad in ["", "H4", "h1", "H3", "H3:", "H3:  ", "H2 ", "H0:x"] {
            assert!(bad.parse::<Handling>().is_err(), "{bad:?}");
        }
        assert!(format!("H3:{}", "x".repeat(513))
            .parse::<Handling>()
            .is_err());
        assert!("H2"
            .parse::<Handling>()
            .unwrap()
            .forbids_onward_transmission());
        assert!(!"H1"
            .parse::<Handling>()
            .unwrap()
            .forbids_onward_transmission());
        assert!("H1".parse::<Handling>().unwrap().not_for_court());
    }

    #[test]
    fn evaluation_codes_are_a_source_letter_and_an_information_digit() {
        assert_eq!("B2".parse::<Evaluation>().unwrap().to_string(), "B2");
        assert_eq!("X4".parse::<Evaluation>().unwrap().information, 4);
        for bad in ["", "B", "B5", "D1", "b2", "B22", "2B", "A0"] {
            assert!(bad.parse::<Evaluation>().is_err(), "{bad:?}");
        }
    }
}
