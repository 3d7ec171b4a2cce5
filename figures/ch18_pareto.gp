# Chapter 18: recall accuracy against what a decoder keeps (left: values held per layer after T tokens) and
# against what one decode step reads (right: values read per layer at T), every mixer at matched parameters;
# the Pareto front of each point dashed (no other mixer is as accurate with fewer values). Data: the committed
# full sweep, chapters/18_trained_from_scratch/results/results.csv
# (task,length,x,variant,key,mean,low,high,held,read,pareto_held,pareto_read), read from figures/.
load 'style.gp'
if (!exists("dir")) dir = '../chapters/18_trained_from_scratch/results'
data = dir.'/results.csv'
set datafile separator ','
set terminal svg enhanced size 1080, 460 font 'sans-serif,12' background rgb 'white'
set output outfile
set multiplot layout 1, 2 title 'Recall against the cache: 16 pairs, matched parameters (mean of seeds; dashed: Pareto front)' font 'sans-serif,14'
set logscale x 2
set format x '%.0f'
set yrange [0 : 1.35]
set ytics 0, 0.2, 1
set ylabel 'recall accuracy'
set key bottom right font ',10'
on(n) = strcol(1) eq 'recall' && column(2) == n && column(3) == 16
# The front's points of length n sorted by their cost (column c), for a line: awk picks them, sort orders them.
front(n, c) = sprintf("< awk -F, '$1 == \"recall\" && $2 == %d && $3 == 16 && $%d == 1 {print $%d \",\" $6}' '%s' | sort -t, -k1,1n", n, c + 2, c, data)
do for [panel = 0 : 1] {
  c = panel == 0 ? 9 : 10
  set title (panel == 0 ? 'values kept per layer after T tokens' : 'values read per layer by one decode step at T') font 'sans-serif,13'
  set xlabel (panel == 0 ? 'values held (cache and fixed state), per layer' : 'values read, per layer')
  plot data using (on(64) ? column(c) : NaN) : 6 : 7 : 8 with yerrorbars linetype 1 title 'T = 64', \
       front(64, c) using 1 : 2 with steps linetype 1 dashtype 2 notitle, \
       data using (on(64) ? column(c) : NaN) : 6 : 5 with labels rotate by 50 offset char 0.3, char 0.5 left font ',9' textcolor rgb '#0072b2' notitle, \
       data using (on(128) ? column(c) : NaN) : 6 : 7 : 8 with yerrorbars linetype 2 title 'T = 128', \
       front(128, c) using 1 : 2 with steps linetype 2 dashtype 2 notitle, \
       data using (on(128) ? column(c) : NaN) : 6 : 5 with labels rotate by -50 offset char 0.3, char -0.5 left font ',9' textcolor rgb '#d55e00' notitle
}
unset multiplot
