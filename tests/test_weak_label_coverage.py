import numpy as np

from wsda_jax.tools.experiments import weak_label_coverage

U = 255


def test_coverage_counts_images_and_pixels():
    label = np.array([[0, 0, 1], [2, 2, U]])
    examples = [
        # Coarse keeps class 0's two pixels, one of class 2's, none of class 1's.
        {
            "label": label,
            "coarse_label": np.array([[0, 0, U], [U, 2, U]]),
            "point_label": np.array([[0, U, 1], [U, U, U]]),
        },
        # Class 2 only: no coarse label, one point.
        {
            "label": np.full((2, 3), 2),
            "coarse_label": np.full((2, 3), U),
            "point_label": np.array([[U, U, U], [U, 2, U]]),
        },
    ]
    counts = weak_label_coverage.coverage(examples, num_classes=4)
    np.testing.assert_array_equal(counts["images"], [1, 1, 2, 0])
    np.testing.assert_array_equal(counts["images_coarse"], [1, 0, 1, 0])
    np.testing.assert_array_equal(counts["images_point"], [1, 1, 1, 0])
    np.testing.assert_array_equal(counts["pixels"], [2, 1, 8, 0])
    np.testing.assert_array_equal(counts["pixels_coarse"], [2, 0, 1, 0])
    table = weak_label_coverage.format_table(counts, ["a", "b", "c", "d"])
    assert "| c | 2 | 50 | 50 | 12 |" in table
    assert "| d | 0 | n/a | n/a | n/a |" in table
