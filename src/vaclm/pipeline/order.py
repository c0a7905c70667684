"""The order in which decoder blocks are compressed."""


def block_order(n_blocks: int, order: str) -> list[int]:
    if order == "front-to-back":
        return list(range(n_blocks))
    if order == "back-to-front":
        return list(range(n_blocks - 1, -1, -1))
    if order == "middle-out":  # VAC: start in the middle, alternate outwards (m, m+1, m-1, m+2, ...)
        mid = n_blocks // 2
        out = [mid]
        for step in range(1, n_blocks):
            for i in (mid + step, mid - step):
                if 0 <= i < n_blocks:
                    out.append(i)
        return out[:n_blocks]
    raise ValueError(f"unknown order {order!r}")
