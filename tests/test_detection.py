"""Box parsing, IoU and cIoU on hand examples."""
import pytest

from medcg.eval import detection as det


@pytest.mark.parametrize("text,box", [
    ("[0.1, 0.2, 0.5, 0.6]", (0.1, 0.2, 0.5, 0.6)),
    ("The lesion is at [0.100,0.200,0.500,0.600].", (0.1, 0.2, 0.5, 0.6)),
    ("{<10><20><50><60>}", (0.1, 0.2, 0.5, 0.6)),
    ("<p>polyp</p>{< 10 >< 20 ><50><60>}", (0.1, 0.2, 0.5, 0.6)),
    ("[10, 20, 50, 60]", (0.1, 0.2, 0.5, 0.6)),
    ("(10, 20, 50, 60)", (0.1, 0.2, 0.5, 0.6)),
    ("[0, 0, 1, 1]", (0.0, 0.0, 0.01, 0.01)),          # integers are the 0-100 grid
    ("[0.0, 0.0, 1.0, 1.0]", (0.0, 0.0, 1.0, 1.0)),
])
def test_parse_box_forms(text, box):
  assert det.parse_box(text) == pytest.approx(box)


@pytest.mark.parametrize("text", [
    "no lesion found", "[0.5, 0.5, 0.2, 0.9]", "[10, 20, 150, 60]", "[0.1, 0.2, 0.5]", "{<10><20><5><60>}",
    "[-0.1, 0.2, 0.5, 0.6]", "",
])
def test_malformed_boxes_are_not_boxes(text):
  assert det.parse_box(text) is None


def test_parse_boxes_in_order_and_format_roundtrip():
  text = "{<50><50><90><90>} then [0.1, 0.1, 0.2, 0.2]"
  assert det.parse_boxes(text) == [(0.5, 0.5, 0.9, 0.9), (0.1, 0.1, 0.2, 0.2)]
  assert det.format_box((0.125, 0.3, 0.61, 0.875)) == "[0.125, 0.300, 0.610, 0.875]"
  assert det.parse_box(det.format_box((0.125, 0.3, 0.61, 0.875))) == (0.125, 0.3, 0.61, 0.875)
  with pytest.raises(ValueError, match="x2 <= x1"):
    det.format_box((0.5, 0.1, 0.4, 0.2))
  with pytest.raises(ValueError, match="not normalised"):
    det.format_box((0.5, 0.1, 40, 0.2))


def test_iou_hand_examples():
  a = (0.0, 0.0, 0.5, 0.5)
  assert det.iou(a, a) == 1.0
  assert det.iou(a, (0.5, 0.5, 1.0, 1.0)) == 0.0                      # touching corners
  assert det.iou(a, (0.25, 0.0, 0.75, 0.5)) == pytest.approx(0.125 / 0.375)
  assert det.iou((0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.25)
  assert det.iou(None, a) == 0.0


def test_ciou_is_cumulative_and_counts_unparsed():
  recs = [
      det.DetectionRecord("a", 38, "[0.0, 0.0, 0.5, 0.5]", (0.0, 0.0, 0.5, 0.5)),      # I .25 U .25
      det.DetectionRecord("b", 38, "{<25><0><75><50>}", (0.0, 0.0, 0.5, 0.5)),          # I .125 U .375
      det.DetectionRecord("c", 39, "I cannot find it", (0.0, 0.0, 0.2, 0.5)),            # I 0 U .1
  ]
  s = det.score(recs)
  assert s["n"] == 3 and s["unparsed"] == 1 and s["unparsed_rate"] == pytest.approx(1 / 3)
  assert s["ciou"] == pytest.approx((0.25 + 0.125) / (0.25 + 0.375 + 0.1))
  assert s["mean_iou"] == pytest.approx((1 + 1 / 3 + 0) / 3)
  assert s["acc_at_iou"] == pytest.approx(1 / 3)
  assert s["per_sample"]["c"] == {"box": None, "iou": 0.0}
  by = det.score_by_subset(recs)
  assert by["38"]["ciou"] == pytest.approx(0.375 / 0.625) and by["39"]["ciou"] == 0.0 and by["all"] == s
  assert det.score(list(reversed(recs))) == s


def test_ciou_pixel_weighting_and_errors():
  small = det.DetectionRecord("a", 38, "[0.0, 0.0, 0.5, 0.5]", (0.0, 0.0, 0.5, 0.5), image_size=(10, 10))
  big = det.DetectionRecord("b", 38, "nothing", (0.0, 0.0, 0.5, 0.5), image_size=(100, 100))
  # Pixels: I = 25 + 0, U = 25 + 2500.
  assert det.score([small, big])["ciou"] == pytest.approx(25 / 2525)
  with pytest.raises(ValueError, match="scored twice"):
    det.score([small, small])
  with pytest.raises(ValueError, match="sample bad target"):
    det.score([det.DetectionRecord("bad", 38, "", (0.5, 0.5, 0.1, 0.9))])
