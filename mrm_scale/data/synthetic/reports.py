"""Report writer of the synthetic corpus: the radiology report text of a case, and the words that name findings.

``make_report(index, seed=0) -> (report, labels, meta)`` gives a record's text without drawing its image (cheap);
``_write_report`` phrases a case with the record's report stream (``numpy.random.default_rng([seed, index, 1])``).
``FINDING_WORDS`` are the report words the image decides (a finding, a side or a severity) and
``finding_word_positions`` marks their pieces in a loader batch (the image-use probe and the label-efficiency
experiment use it).
"""

from __future__ import annotations

import numpy as np

from .cases import _SEV_INDEX, _Case, _Finding, _sample_case

# Sentences never contain a colon (the report cleaner treats "NAME:" as a section header).

_LOC_ADJ = {
    ("right", "upper"): ("right upper lobe", "right apical", "right upper zone"),
    ("right", "middle"): ("right middle lobe", "right mid lung", "right perihilar"),
    ("right", "lower"): ("right lower lobe", "right basilar", "right base"),
    ("left", "upper"): ("left upper lobe", "left apical", "left upper zone"),
    ("left", "middle"): ("lingular", "left mid lung", "left perihilar"),
    ("left", "lower"): ("left lower lobe", "left basilar", "left retrocardiac"),
    ("bilateral", "upper"): ("bilateral upper lobe", "biapical", "bilateral upper zone"),
    ("bilateral", "middle"): ("bilateral perihilar", "bilateral mid lung"),
    ("bilateral", "lower"): ("bibasilar", "bilateral lower lobe", "bilateral basal"),
}
_LOC_NOUN = {
    ("right", "upper"): ("the right upper lobe", "the right apex", "the right upper lung"),
    ("right", "middle"): ("the right middle lobe", "the right mid lung zone", "the right perihilar region"),
    ("right", "lower"): ("the right lower lobe", "the right lung base", "the right base"),
    ("left", "upper"): ("the left upper lobe", "the left apex", "the left upper lung"),
    ("left", "middle"): ("the lingula", "the left mid lung zone", "the left perihilar region"),
    ("left", "lower"): ("the left lower lobe", "the left lung base", "the left base"),
    ("bilateral", "upper"): ("both upper lobes", "both lung apices", "the upper lungs bilaterally"),
    ("bilateral", "middle"): ("both mid lungs", "the perihilar regions bilaterally"),
    ("bilateral", "lower"): ("both lung bases", "the lower lobes bilaterally", "the lung bases"),
}
_SEV_WORDS = {
    "pleural_effusion": (("small", "trace", "minimal", "tiny"), ("moderate", "moderate-sized", "small-to-moderate"),
                         ("large", "large-volume", "moderate-to-large")),
    "pneumothorax": (("small", "tiny", "trace"), ("moderate", "moderate-sized", "small-to-moderate"),
                     ("large", "moderate-to-large")),
    "consolidation": (("subtle", "faint", "mild", "hazy"), ("patchy", "moderate", "focal"),
                      ("dense", "extensive", "confluent")),
    "atelectasis": (("minimal", "mild", "subsegmental", "plate-like"), ("moderate", "segmental", "streaky"),
                    ("extensive", "severe")),
    "cardiomegaly": (("mild", "borderline"), ("moderate",), ("severe", "marked", "massive")),
}


# Words of a report that name a finding, a side or a severity: what the image decides. The image-use diagnostic
# (``report/image_gain_finding_words``) restricts its losses to them. Words that also fill templates whatever the
# image shows ("heart", "pleural", zone and lobe words, the "to" of "small-to-moderate") are left out.
FINDING_WORDS: frozenset[str] = frozenset(
    {"cardiomegaly", "enlarged", "enlargement", "effusion", "effusions", "blunting", "pneumothorax", "consolidation",
     "opacity", "opacities", "pneumonia", "infection", "nodule", "nodular", "mass", "atelectasis", "atelectatic",
     "collapse", "edema", "congestion", "haziness", "kerley"}
    | {"right", "left", "bilateral", "bilaterally", "bibasilar", "biapical"}
    | {w for table in _SEV_WORDS.values() for level in table for phrase in level for w in phrase.split("-")
       if w not in ("to", "sized", "like", "volume", "plate")}
    | {"mildly", "moderately", "markedly"}
)


def finding_word_positions(tok, batch: dict):
    """(B, L) bool tensor: the pieces of the :data:`FINDING_WORDS` in a loader batch (``input_ids``,
    ``word_start``, ``attention_mask``), for ``tok`` the shards' tokenizer."""
    import torch

    from ..tokenizer import word_positions

    return torch.from_numpy(word_positions(tok, batch["input_ids"], batch["word_start"], batch["attention_mask"],
                                           FINDING_WORDS))


class _Writer:
    """Report phrasing for one record; ``rng`` is the record's report stream."""

    def __init__(self, case: _Case, rng: np.random.Generator):
        self.case, self.rng = case, rng
        self.style = "openi" if rng.random() < 0.3 else "mimic"
        self.P = "XXXX" if self.style == "openi" else "___"   # de-identification placeholder
        self.prior = rng.random() < 0.5
        self.sizes: dict = {}

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    # ------------------------------------------------------------------------------ noun phrases
    def sev_word(self, f: _Finding) -> str:
        return self.pick(_SEV_WORDS[f.name][_SEV_INDEX[f.severity]])

    def loc(self, f: _Finding, noun: bool = False) -> str:
        return self.pick((_LOC_NOUN if noun else _LOC_ADJ)[(f.side, f.zone)])

    def noun_phrase(self, f: _Finding) -> tuple[str, str]:
        """(phrase, grammar) with grammar 'a' (countable), 'pl' (plural) or 'mass'."""
        n, s, bi = f.name, f.severity, f.side == "bilateral"
        if n == "pleural_effusion":
            word = "pleural effusions" if bi else self.pick(("pleural effusion", "effusion", "pleural effusion"))
            return f"{self.sev_word(f)} {f.side} {word}", ("pl" if bi else "a")
        if n == "pneumothorax":
            where = self.pick(("apical ", "apicolateral ", "")) if s != "severe" else ""
            return f"{self.sev_word(f)} {f.side} {where}pneumothorax", "a"
        if n == "consolidation":
            noun = self.pick(("consolidation", "opacity", "airspace opacity", "airspace consolidation")
                             + (("pneumonia",) if s != "mild" else ()))
            if self.chance(0.5):
                return f"{self.sev_word(f)} {self.loc(f)} {noun}", ("a" if noun.endswith("opacity") else "mass")
            return f"{self.sev_word(f)} {noun} in {self.loc(f, True)}", ("a" if noun.endswith("opacity") else "mass")
        if n == "nodule":
            if f not in self.sizes:                 # one measurement per finding, reused by the impression
                mm = {"mild": self.rng.integers(5, 10), "moderate": self.rng.integers(10, 20),
                      "severe": self.rng.integers(26, 41)}[s]
                self.sizes[f] = (f"{mm} mm" if mm < 10 or self.chance(0.4) else f"{mm / 10:.1f} cm")
            size = self.sizes[f] if s != "mild" or self.chance(0.6) else self.pick(("small", "subcentimeter", "tiny"))
            kind = "mass" if s == "severe" else self.pick(("nodule", "pulmonary nodule", "nodular opacity"))
            if self.chance(0.5):
                return f"{size} {self.loc(f)} {kind}", "a"
            return f"{size} {kind} in {self.loc(f, True)}", "a"
        if n == "atelectasis":
            if s == "severe" and f.zone == "lower" and f.side != "bilateral" and self.chance(0.5):
                return f"{f.side} lower lobe collapse", "mass"
            kind = self.pick(("atelectasis", "atelectasis", "atelectatic change"))
            if self.chance(0.6):
                return f"{self.sev_word(f)} {self.loc(f)} {kind}", "mass"
            return f"{self.sev_word(f)} {kind} at {self.loc(f, True)}", "mass"
        if n == "edema":
            return self.pick((("mild pulmonary vascular congestion", "mild interstitial edema",
                               "minimal pulmonary edema", "mild pulmonary edema"),
                              ("moderate pulmonary edema", "moderate interstitial pulmonary edema",
                               "interstitial edema with septal lines"),
                              ("severe pulmonary edema", "diffuse alveolar edema",
                               "severe bilateral perihilar pulmonary edema"))[_SEV_INDEX[s]]), "mass"
        if n == "cardiomegaly":
            return f"{self.sev_word(f)} cardiomegaly", "mass"
        raise KeyError(n)

    @staticmethod
    def article(np_: str, grammar: str) -> str:
        if grammar != "a":
            return np_
        return ("an " if np_[0] in "aeiou" or np_[:2] in ("8 ", "8.", "11", "18") else "a ") + np_

    # -------------------------------------------------------------------------------- sentences
    def positive(self, f: _Finding) -> str:
        special = self.special(f)
        if special and self.chance(0.4):
            return special
        np_, g = self.noun_phrase(f)
        a = self.article(np_, g)
        verb = "are" if g == "pl" else "is"
        if f.severity == "mild" and self.chance(0.3):
            return self.pick((f"Possible {np_}.", f"{_cap(a)} cannot be excluded.", f"Questionable {np_}.",
                              f"Findings may represent {a}.", f"Cannot exclude {a}.", f"Suspected {np_}."))
        if self.prior and self.chance(0.4):
            return self.pick((f"Again seen is {a}.", f"{_cap(np_)}, unchanged from prior.",
                              f"Interval development of {a}.", f"{_cap(np_)}, new since {self.P}.",
                              f"{_cap(np_)} {verb} slightly increased compared with {self.P}.",
                              f"{_cap(np_)} {verb} decreased since the prior examination.",
                              f"Stable {np_}."))
        there = "There are" if g == "pl" else "There is"
        return self.pick((f"{there} {a}.", f"{_cap(np_)}.", f"{_cap(np_)} {verb} present.",
                          f"{_cap(np_)} {verb} noted.", f"{_cap(np_)} {verb} seen.", f"{_cap(a)} {verb} identified."))

    def special(self, f: _Finding) -> str | None:
        n, s, side = f.name, f.severity, f.side
        if n == "cardiomegaly":
            return self.pick((("The heart is mildly enlarged.", "Mild enlargement of the cardiac silhouette.",
                               "Heart size is mildly enlarged."),
                              ("The heart is moderately enlarged.", "Moderate enlargement of the cardiac silhouette.",
                               "The cardiac silhouette is moderately enlarged."),
                              ("The heart is markedly enlarged.", "Marked enlargement of the cardiac silhouette.",
                               "Severe enlargement of the cardiac silhouette is present."))[_SEV_INDEX[s]])
        if n == "pleural_effusion":
            if s == "mild":
                return (f"Blunting of the {side} costophrenic angle, likely a small pleural effusion."
                        if side != "bilateral" else "Blunting of both costophrenic angles suggests small effusions.")
            if s == "severe" and side != "bilateral":
                return self.pick((f"Large {side} pleural effusion obscures the {side} hemidiaphragm.",
                                  f"Large layering {side} pleural effusion."))
            return None
        if n == "pneumothorax":
            if s == "mild":
                return self.pick((f"A thin {side} apical pleural line with absent lung markings beyond it is "
                                  f"consistent with a small pneumothorax.",
                                  f"Tiny {side} apical pneumothorax."))
            if s == "severe":
                return f"Large {side} pneumothorax with partial collapse of the {side} lung."
            return None
        if n == "consolidation":
            return self.pick((f"There is an opacity in {self.loc(f, True)}, concerning for pneumonia.",
                              f"Airspace consolidation in {self.loc(f, True)} is compatible with pneumonia.",
                              f"New {self.loc(f)} opacity may reflect infection."))
        if n == "nodule" and s != "severe":
            return f"There is a rounded opacity in {self.loc(f, True)}, concerning for a pulmonary nodule."
        if n == "atelectasis" and s != "severe":
            return self.pick((f"Linear opacities at {self.loc(f, True)} likely reflect atelectasis.",
                              f"Plate-like atelectasis at {self.loc(f, True)}."))
        if n == "edema":
            return self.pick((("Mild pulmonary vascular congestion.", "There is mild interstitial edema."),
                              ("Moderate pulmonary edema with Kerley B lines.",
                               "Perihilar haziness and septal lines indicate moderate interstitial edema."),
                              ("Severe pulmonary edema with perihilar predominance.",
                               "Diffuse bilateral alveolar edema is present."))[_SEV_INDEX[s]])
        return None

    def device(self, d: dict) -> str:
        k, P = d["kind"], self.P
        side = d.get("side", "")
        if k == "ett":
            cm = d["tip_cm"]
            return self.pick((f"Endotracheal tube terminates {cm} cm above the carina.",
                              f"The endotracheal tube tip is {cm} cm above the carina.",
                              f"ET tube in standard position, approximately {cm} cm from the carina."))
        if k == "ngt":
            return self.pick(("Enteric tube courses below the diaphragm with the tip in the stomach.",
                              "Nasogastric tube terminates in the stomach.",
                              "An orogastric tube extends into the stomach.",
                              "The nasogastric tube tip projects over the stomach."))
        if k == "cvc":
            tip = d["tip"]
            if d["route"] == "picc":
                return self.pick((f"{_cap(side)} PICC line tip projects over the {tip}.",
                                  f"{_cap(side)}-sided PICC terminates in the {tip}."))
            return self.pick((f"{_cap(side)} internal jugular central venous catheter terminates in the {tip}.",
                              f"{_cap(side)}-sided central line with tip in the {tip}.",
                              f"{_cap(side)} IJ line ends in the {tip}."))
        if k == "pacemaker":
            return self.pick((f"{_cap(side)}-sided pacemaker with leads in the right atrium and right ventricle.",
                              f"{_cap(side)} chest wall dual-chamber pacer device with leads in the right atrium "
                              f"and right ventricle.",
                              "Transvenous pacemaker leads are unchanged in position."))
        if k == "sternotomy":
            return self.pick(("Median sternotomy wires are intact.", "Patient is status post median sternotomy.",
                              f"Sternotomy wires are again noted, unchanged since {P}."))
        if k == "chest_tube":
            return self.pick((f"{_cap(side)} chest tube in place with tip at the apex.",
                              f"A {side} pigtail pleural catheter is present.", f"{_cap(side)}-sided chest tube."))
        raise KeyError(k)

    def impression_item(self, f: _Finding) -> str:
        np_, g = self.noun_phrase(f)
        text = _cap(np_) + "."
        if f.name == "consolidation":
            text = _cap(np_) + self.pick((", concerning for pneumonia.", ", which may reflect pneumonia in the "
                                          "appropriate clinical setting.", ".", ", infection not excluded."))
        elif f.name == "nodule":
            text += self.pick((" Recommend chest CT for further characterization.",
                               " Nonemergent CT of the chest is recommended.", ""))
        elif f.name == "pneumothorax" and self.chance(0.5):
            text += (f" Findings were discussed with Dr. {self.P} by telephone at {self.P} on {self.P}, "
                     f"at the time of discovery.")
        elif f.severity == "mild" and self.chance(0.25):
            text = f"Possible {np_}."
        return text

    # -------------------------------------------------------------------------------- the report
    def write(self) -> str:
        c, P, rng = self.case, self.P, self.rng
        shown = [f for f in c.findings if not (f.severity == "mild" and self.chance(0.04))]   # the rare miss
        names = {f.name for f in shown}
        pos = [f for f in shown if f.name not in ("cardiomegaly", "support_devices")]
        rng.shuffle(pos)
        body: list[str] = []
        if self.chance(0.35):
            body.append(self.pick(("Portable semi-upright AP view of the chest.",
                                   "Single portable AP chest radiograph.",
                                   "Supine portable view of the chest.") if c.view == "AP" else
                                  ("PA and lateral views of the chest were obtained.", "PA view of the chest.",
                                   "Frontal and lateral views of the chest.")))
        if self.prior:
            change = "there are interval changes" if len(names - {"support_devices"}) else "there is no change"
            body.append(self.pick((f"Compared with the prior study of {P}, {change}.",
                                   f"Comparison is made to the prior radiograph from {P}.",
                                   f"As compared to the previous radiograph of {P}, findings are described below.",
                                   f"Since the prior examination dated {P}, the appearance has changed.")))
        elif self.chance(0.2):
            body.append("No prior studies are available for comparison.")
        devices = [self.device(d) for d in c.devices if "support_devices" in names]
        lead_devices = self.chance(0.6)
        body += devices if lead_devices else []
        if "cardiomegaly" in names:
            body.append(self.positive(c.get("cardiomegaly")))
        else:
            body.append(self.pick(("Heart size is normal.", "The heart is normal in size.",
                                   "The cardiac silhouette is within normal limits.",
                                   "Normal cardiomediastinal silhouette.", "The heart is not enlarged.",
                                   "The cardiomediastinal silhouette is unremarkable.",
                                   f"Heart size and pulmonary {P} are within normal limits." if self.style == "openi"
                                   else "Heart size is top normal.")))
        if self.chance(0.4):
            body.append(self.pick(("Mediastinal and hilar contours are normal.", "The mediastinum is unremarkable.",
                                   "Hilar contours are unremarkable.", "The aorta is mildly tortuous.")))
        body += [self.positive(f) for f in pos]
        body += self.negatives(names)
        body += [] if lead_devices else devices
        if self.chance(0.45):
            body.append(self.pick(("Osseous structures are intact.", "No acute osseous abnormality.",
                                   "The visualized osseous structures are unremarkable.",
                                   "Mild degenerative changes of the thoracic spine.",
                                   f"{P} and soft tissues are unremarkable." if self.style == "openi"
                                   else "Visualized upper abdomen is unremarkable.",
                                   "Atherosclerotic calcification of the aortic knob.")))
        impression = self.impression(shown)
        parts = []
        if self.chance(0.5):
            parts.append(self.preamble())
        parts.append("FINDINGS: " + " ".join(body))
        parts.append("IMPRESSION: " + impression)
        return "\n\n".join(parts)

    def negatives(self, names: set) -> list[str]:
        out = []
        eff, ptx = "pleural_effusion" in names, "pneumothorax" in names
        if not eff and not ptx:
            out.append(self.pick(("No pleural effusion or pneumothorax.",
                                  "There is no pleural effusion or pneumothorax.",
                                  "No pneumothorax or pleural effusion is seen.", "No effusion or pneumothorax.",
                                  "There is no evidence of pneumothorax or pleural effusion.",
                                  "The costophrenic angles are sharp and there is no pneumothorax.")))
        elif not eff:
            out.append(self.pick(("No pleural effusion.", "There is no pleural effusion.",
                                  "The costophrenic angles are sharp.", "No effusion is seen.")))
        elif not ptx:
            out.append(self.pick(("No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen.",
                                  "No evidence of pneumothorax.")))
        lung = names & {"consolidation", "atelectasis", "nodule", "edema"}
        if not lung and not eff:
            out.append(self.pick(("The lungs are clear.", "Lungs are well expanded and clear.",
                                  "The lungs are clear without focal consolidation.", "No focal consolidation is seen.",
                                  "There is no focal airspace consolidation.", "Clear lungs bilaterally.",
                                  "No focal airspace disease.")))
        elif "consolidation" not in names and self.chance(0.7):
            out.append(self.pick(("No focal consolidation.", "No new focal consolidation.",
                                  "There is no focal consolidation elsewhere.",
                                  "No consolidation to suggest pneumonia.")))
        if "edema" not in names and self.chance(0.5):
            out.append(self.pick(("No pulmonary edema.", "No evidence of pulmonary edema.",
                                  "Pulmonary vasculature is within normal limits.",
                                  "There is no pulmonary vascular congestion.")))
        if "nodule" not in names and self.chance(0.08):
            out.append("No suspicious pulmonary nodules are seen.")
        return out

    def impression(self, shown: list[_Finding]) -> str:
        pathology = sorted((f for f in shown if f.name != "support_devices"),
                           key=lambda f: -_SEV_INDEX[f.severity])
        items = [self.impression_item(f) for f in pathology if f.severity != "mild" or self.chance(0.75)]
        if any(f.name == "support_devices" for f in shown) and self.chance(0.5):
            tubes = any(d["kind"] in ("ett", "ngt", "cvc", "chest_tube") for d in self.case.devices)
            items.append(self.pick(("Lines and tubes in standard position.",) if tubes else
                                   ("Support devices as described above.",
                                    "Appropriately positioned support devices.")))
        if not pathology:
            items.insert(0, self.pick(("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                                       "No acute intrathoracic process.", "Normal chest radiograph.",
                                       "No radiographic evidence of pneumonia.", "No acute findings.",
                                       f"No acute cardiopulmonary disease. {self.P} stable." if self.style == "openi"
                                       else "Unremarkable chest radiograph.")))
        elif not items:
            items = [self.impression_item(pathology[0])]
        if len(items) > 1 and self.chance(0.45):
            return " ".join(f"{i + 1}. {t}" for i, t in enumerate(items))
        return " ".join(items)

    def preamble(self) -> str:
        P = self.P
        exam = ("EXAMINATION: CHEST (PORTABLE AP)" if self.case.view == "AP" else
                self.pick(("EXAMINATION: CHEST (PA AND LAT)", "EXAMINATION: Chest radiograph, two views")))
        who = self.pick(("man", "woman", "male", "female", "patient"))
        why = self.pick(("shortness of breath", "cough and fever", "chest pain", "hypoxia",
                         "evaluate for pneumonia", "preoperative evaluation", "line placement"))
        lines = [exam, f"INDICATION: {P}-year-old {who} with {why}."]
        lines.append(f"COMPARISON: {P}." if self.prior else "COMPARISON: None.")
        return "\n".join(lines)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _write_report(case: _Case, rng: np.random.Generator) -> str:
    return _Writer(case, rng).write()


def make_report(index: int, seed: int = 0) -> tuple[str, dict, dict]:
    """(report, labels, meta) of record ``index`` without rendering its image (cheap)."""
    case = _sample_case(np.random.default_rng([seed, index, 0]))
    report = _write_report(case, np.random.default_rng([seed, index, 1]))
    return report, case.labels(), case.meta(seed, index)
